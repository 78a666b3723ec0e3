"""Request handling: from a request to a routing decision, and the bookkeeping around it.

The :class:`Director` implements :class:`epp.extproc.stream.Router`. Per request it

1. parses the body (:mod:`epp.openai_request`) and checks the model name;
2. tokenizes it once as the engine will (:mod:`epp.tokenizer`) unless the prompt already
   is token ids, and hashes the full blocks (:mod:`epp.hashing`);
3. builds the candidates: the pool's workers, narrowed by the gateway's subset hint (and by
   the conformance header when that hook is on), each with its KV overlap from the index,
   its booked load and its scraped metrics;
4. asks the scheduler, books the load, writes the decision log;
5. hands back the destination, the worker headers, the body with ``nvext.token_data``.

The response-phase hooks mark prefill done at the first byte and free the booking at the
end, whatever the end is (each booking is freed exactly once: :class:`ActiveLoad` ignores a
second free).

Steps 1–2 are the CPU-heavy part and depend on nothing but the request; steps 3–5 read and
change the index and the bookkeeping, which belong to the event loop. A request whose body
is larger than ``offload_body_bytes`` therefore has steps 1–2 done in the
:class:`~epp.preprocess.Preprocessor`'s threads (:meth:`Director.route` returns an awaitable
then), and only steps 3–5 on the loop; smaller ones are routed in one go, which is cheaper
than a hand-off between threads.

Limits: a body nested deeper than ``max_json_depth`` is refused before it is decoded, and a
prompt that cannot fit ``max_model_len`` gets vLLM's 400 before it is routed or booked
(:mod:`epp.context_length`), tokenized no further than needed to know.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from epp import context_length, hashing
from epp import headers as H
from epp import metrics as M
from epp.context_length import PromptTooLong
from epp.datalayer.scraper import MetricsScraper
from epp.decisions import CandidateRecord, DecisionLog, DecisionRecord, Ranked
from epp.extproc.stream import RequestInfo, Routed, RoutingError, encode_body
from epp.kvindex.index import KvIndex, Overlap
from epp.openai_request import ParsedRequest, RequestError, parse_request
from epp.pool import AddressFilter, Pool
from epp.preprocess import PoolFull, Preprocessor
from epp.response_usage import Usage
from epp.scheduling.load import ActiveLoad, Booking
from epp.scheduling.scheduler import Decision, Scheduler
from epp.scheduling.types import (
    Candidate,
    EndpointMetrics,
    ProfileResult,
    SchedulingError,
    SchedulingRequest,
    Worker,
)
from epp.token_budget import DeadlineReached, TokenBudget
from epp.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("epp.decisions")

_encode_json = msgspec.json.Encoder().encode

# What vLLM's request models (pydantic, lax mode) take for a boolean field.
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})


def _lax_bool(value: Any, name: str) -> bool | None:
    """``value`` as vLLM reads a boolean request field; None when absent; 400 otherwise."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise RoutingError(400, f"'{name}' must be a boolean")


_TIER_NAMES = ("device", "host", "disk", "external")


@dataclass(slots=True)
class DirectorConfig:
    """Request-handling settings (the scheduling ones live in the scheduler's config)."""

    block_size: int = hashing.DEFAULT_BLOCK_SIZE
    served_model_names: tuple[str, ...] = ()
    lora_adapters: tuple[str, ...] = ()
    """Model names that are LoRA adapters (``--lora-adapter``); adapters the engines report
    loaded or waiting in their metrics are recognized without being listed."""
    token_data: bool = True
    fallbacks: int = 0
    subset_filter: bool = True
    testing_filter: bool = False
    """The conformance ``header-based-testing-filter``: candidates are the endpoints the
    ``test-epp-endpoint-selection`` header lists (none when it is missing)."""
    served_verifier: bool = False
    """The conformance ``destination-endpoint-served-verifier``: the served endpoint goes
    back to the client in ``x-conformance-test-served-endpoint``."""
    decision_log_size: int = 256
    prefix_text: bool = True
    """Build the prompt's text form for the scheduler (only the ``prefix-cache-scorer``
    reads it)."""
    max_json_depth: int = 128
    """Bodies nested deeper are refused with 400 before they are decoded."""
    max_model_len: int | None = None
    """The model's context length; a prompt that cannot fit gets 400. None: no check."""
    offload_body_bytes: int = 64 * 1024
    """Bodies larger than this are parsed and tokenized in the preprocessing pool."""


@dataclass(slots=True)
class _Prepared:
    """The request-only part of a decision (steps 1–2), computable in any thread."""

    parsed: ParsedRequest
    token_ids: Sequence[int] | None
    request: SchedulingRequest
    body: bytes | bytearray | None = None
    """The body to forward, when it was built with the rest (preprocessing threads do)."""
    body_messages: list[bytes] | None = None
    """``body`` encoded for the gateway, likewise."""


@dataclass(slots=True)
class _Exchange:
    """The router's state for one routed request (``Routed.state``)."""

    request_id: str
    model: str
    worker: Worker
    bookings: list[Booking] = field(default_factory=list)
    prefill_booking: Booking | None = None
    conformance: bool = False
    started: float = field(default_factory=time.monotonic)
    # Kept to re-run the post-pick hooks on the served endpoint (gateway retries).
    request: SchedulingRequest | None = None
    decision: Decision | None = None


def _prefix_text(parsed: ParsedRequest) -> bytes:
    """The prompt as text, as the approximate prefix index hashes it."""
    body = parsed.body
    if parsed.api == "chat":
        return _encode_json(body.get("messages"))
    if parsed.api == "completions":
        prompt = body.get("prompt")
        return prompt.encode("utf-8") if isinstance(prompt, str) else _encode_json(prompt)
    return _encode_json(body.get("input"))


def worker_label(worker: Worker, dp_size: int = 1) -> str:
    """``ip:port`` for a single-rank endpoint, ``ip:port#rank`` otherwise."""
    return worker[0] if dp_size <= 1 and worker[1] == 0 else f"{worker[0]}#{worker[1]}"


class Director:
    """Turns requests into decisions; see the module docstring."""

    def __init__(
        self,
        *,
        pool: Pool,
        index: KvIndex,
        load: ActiveLoad,
        scheduler: Scheduler,
        config: DirectorConfig,
        tokenizer: Tokenizer | None = None,
        scraper: MetricsScraper | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        preprocessor: Preprocessor | None = None,
    ) -> None:
        self.pool = pool
        self.preprocessor = preprocessor
        self.index = index
        self.load = load
        self.scheduler = scheduler
        self.config = config
        self.tokenizer = tokenizer
        self.scraper = scraper
        self.rng = rng or random.Random()
        self.clock = clock
        self.decisions = DecisionLog(config.decision_log_size)
        self._adapters = frozenset(config.lora_adapters)
        # Adapters are served names too.
        self._served = frozenset(config.served_model_names) | self._adapters

    # ----------------------------------------------------------- candidates

    def _eligible(self, info: RequestInfo) -> list[tuple[Worker, Any]]:
        workers = self.pool.workers()
        scraper = self.scraper
        if scraper is not None:
            # A model server its scraper cannot reach is down: requests sent there would
            # fail, so it is no candidate until it answers again.
            unreachable = scraper.unreachable
            workers = [(w, ep) for w, ep in workers if not unreachable(w[0])]
        if self.config.testing_filter:
            wanted = info.headers.get(H.TEST_ENDPOINT_SELECTION)
            selection = AddressFilter((wanted or "").split(","))
            workers = [(w, ep) for w, ep in workers if selection.allows(w[0])]
        elif self.config.subset_filter:
            hint = info.metadata.get(H.SUBSET_NAMESPACE)
            if isinstance(hint, dict) and H.DESTINATION_SUBSET in hint:
                value = hint[H.DESTINATION_SUBSET]
                entries = value.split(",") if isinstance(value, str) else value or []
                subset = AddressFilter(str(e) for e in entries)
                workers = [(w, ep) for w, ep in workers if subset.allows(w[0])]
        return workers

    # ---------------------------------------------------------------- route

    def route(self, info: RequestInfo) -> Routed | Awaitable[Routed]:
        started = self.clock()
        workers = self._eligible(info)
        if not workers:
            M.REQUEST_ERRORS.labels("", "", "ServiceUnavailable").inc()
            raise RoutingError(503, "no ready endpoint for this request")
        if info.body is None:
            return self._route_bodyless(info, workers)
        scraper = self.scraper
        # Read once: the LoRA check and the candidates both need them.
        metrics = [scraper.get(w) if scraper is not None else None for w, _ep in workers]
        if self.preprocessor is not None and len(info.body) > self.config.offload_body_bytes:
            return self._route_later(info, started, metrics)
        prepared = self._prepare(info, metrics, None)
        return self._decide(info, prepared, workers, metrics, started)

    async def _route_later(
        self, info: RequestInfo, started: float, metrics: list[EndpointMetrics | None]
    ) -> Routed:
        assert self.preprocessor is not None
        try:
            prepared = await self.preprocessor.run(
                lambda budget: self._prepare(info, metrics, budget)
            )
        except PoolFull as exc:
            M.REQUEST_ERRORS.labels("", "", "ResourceExhausted").inc()
            raise RoutingError(429, str(exc)) from None
        except DeadlineReached as exc:
            M.REQUEST_ERRORS.labels("", "", "GatewayTimeout").inc()
            raise RoutingError(504, str(exc)) from None
        # The pool may have changed while the request was prepared.
        workers = self._eligible(info)
        if not workers:
            M.REQUEST_ERRORS.labels("", "", "ServiceUnavailable").inc()
            raise RoutingError(503, "no ready endpoint for this request")
        scraper = self.scraper
        metrics = [scraper.get(w) if scraper is not None else None for w, _ep in workers]
        return self._decide(info, prepared, workers, metrics, started)

    def _prepare(
        self,
        info: RequestInfo,
        metrics: list[EndpointMetrics | None],
        budget: TokenBudget | None,
    ) -> _Prepared:
        """Steps 1–2: parse, check, tokenize, hash (and, in a preprocessing thread, build
        the forwarded body). Reads only the request and this director's fixed settings, so
        it may run in any thread; ``budget`` carries the pool's deadline."""
        assert info.body is not None
        try:
            parsed = parse_request(info.path, info.body, max_json_depth=self.config.max_json_depth)
        except RequestError as exc:
            if exc.limit is not None:
                M.LIMIT_REFUSALS.labels(exc.limit).inc()
            M.REQUEST_ERRORS.labels("", "", "BadRequest").inc()
            raise RoutingError(exc.status, exc.reason) from None
        model = parsed.model
        if self._served and model not in self._served:
            M.REQUEST_ERRORS.labels(model, "", "BadRequest").inc()
            raise RoutingError(
                400,
                f"model {model!r} is not served here (served: {', '.join(sorted(self._served))})",
            )
        token_ids = self._tokens(parsed, budget)
        req = self._scheduling_request(info, parsed, token_ids, self._lora_name(model, metrics))
        prepared = _Prepared(parsed, token_ids, req)
        if budget is not None:
            # Off the loop, everything the body costs is done here, its encoding included.
            forwarded = self._forwarded_body(parsed, token_ids, info.body)
            # Neither the document nor (when a new body was built) the original is read
            # again: letting them go now keeps a large request's peak memory near twice
            # its body, not four times (RequestInfo.body's contract allows it).
            parsed.body = {}
            prepared.body = info.body if forwarded is None else forwarded
            info.body = None
            del forwarded
            prepared.body_messages = encode_body(prepared.body)
        return prepared

    def _decide(
        self,
        info: RequestInfo,
        prepared: _Prepared,
        workers: list[tuple[Worker, Any]],
        metrics: list[EndpointMetrics | None],
        started: float,
    ) -> Routed:
        """Steps 3–5, on the event loop: candidates, schedule, book, answer."""
        req = prepared.request
        model = prepared.parsed.model
        matches = self.index.find_matches(req.block_keys) if len(req.block_keys) else None
        candidates = []
        view = self.load.view
        new_blocks = self.load.new_blocks
        unique_keys = frozenset(req.block_keys)  # de-duplicated once, not per candidate
        for (worker, ep), m in zip(workers, metrics, strict=True):
            overlap = matches.overlap(worker) if matches is not None else Overlap(0)
            candidates.append(
                Candidate(
                    worker=worker,
                    role=ep.role,
                    overlap=overlap,
                    load=view(worker),
                    new_blocks=new_blocks(worker, unique_keys),
                    metrics=m,
                )
            )
        try:
            decision = self.scheduler.schedule(
                req, candidates, fallbacks=self.config.fallbacks, rng=self.rng
            )
        except SchedulingError as exc:
            code = "ResourceExhausted" if exc.status == 429 else "ServiceUnavailable"
            M.REQUEST_ERRORS.labels(model, model, code).inc()
            raise RoutingError(exc.status, exc.reason) from None
        self.scheduler.after_pick(req, decision)
        routed = self._apply(info, prepared, decision)
        elapsed = (self.clock() - started) * 1000.0
        M.SCHEDULER_E2E.observe(elapsed / 1000.0)
        M.REQUESTS.labels(model, model, str(req.priority)).inc()
        M.RUNNING.labels(model).inc()
        self._record(req, decision, routed.destination, elapsed, candidates)
        return routed

    def _route_bodyless(self, info: RequestInfo, workers: list[tuple[Worker, Any]]) -> Routed:
        worker, _ep = self.rng.choice(workers)
        exchange = _Exchange(request_id=info.request_id, model="", worker=worker)
        exchange.conformance = self.config.served_verifier
        return Routed(
            destination=worker[0], set_headers=self._worker_headers(worker), state=exchange
        )

    def _tokens(self, parsed: ParsedRequest, budget: TokenBudget | None) -> Sequence[int] | None:
        """The prompt's token ids (None when there is no single prompt to match, or no
        tokenizer for a text prompt); a prompt that cannot fit the context is a 400."""
        body = parsed.body
        # vLLM's request field; its default differs by API (true for completions, false
        # for chat, whose template writes the special tokens itself).
        special = _lax_bool(body.get("add_special_tokens"), "add_special_tokens")
        max_len = self.config.max_model_len
        if max_len is not None and parsed.max_tokens is not None and parsed.max_tokens > max_len:
            M.LIMIT_REFUSALS.labels("context_length").inc()
            raise RoutingError(
                400, context_length.output_refusal(max_len, parsed.max_tokens, "max_tokens")
            )
        limit = None if max_len is None else context_length.input_limit(max_len, parsed.max_tokens)
        if limit is not None:
            budget = (
                TokenBudget(limit)
                if budget is None
                else TokenBudget(limit, budget.deadline, budget.cancelled)
            )
        tok = self.tokenizer
        try:
            if parsed.api == "completions":
                return self._completion_tokens(body.get("prompt"), special, budget)
            if tok is None:
                return None
            if parsed.api == "chat":
                return tok.encode_chat(
                    body["messages"],
                    tools=body.get("tools"),
                    add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                    continue_final_message=bool(body.get("continue_final_message", False)),
                    chat_template_kwargs=body.get("chat_template_kwargs"),
                    add_special_tokens=bool(special),
                    budget=budget,
                )
            if parsed.api == "responses":
                return tok.encode_responses_input(
                    body.get("input"), body.get("instructions"), budget=budget
                )
        except PromptTooLong as exc:
            assert max_len is not None
            M.LIMIT_REFUSALS.labels("context_length").inc()
            raise RoutingError(
                400, context_length.refusal(max_len, parsed.max_tokens, exc)
            ) from None
        except DeadlineReached:
            raise
        except (TokenizerError, TypeError, ValueError) as exc:
            # TypeError/ValueError: request fields of the wrong shape reaching the template
            # (e.g. chat_template_kwargs that is not an object); the client's fault, not ours.
            raise RoutingError(400, f"cannot apply the chat template: {exc}") from None
        return None

    def _completion_tokens(
        self, prompt: Any, special: bool | None, budget: TokenBudget | None
    ) -> Sequence[int] | None:
        add = True if special is None else special
        tok = self.tokenizer
        limit = None if budget is None else budget.limit
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            if limit is not None and len(prompt) > limit:
                raise PromptTooLong(tokens=len(prompt))
            return prompt
        if isinstance(prompt, str):
            if tok is None:
                return None
            return tok.encode_prompt(prompt, add_special_tokens=add, budget=budget)
        # A batch of prompts: no single prefix to match, but each must fit.
        if limit is not None and isinstance(prompt, list):
            for item in prompt:
                if isinstance(item, list):
                    if len(item) > limit:
                        raise PromptTooLong(tokens=len(item))
                elif tok is not None and isinstance(item, str):
                    tok.check_length(item, add_special_tokens=add, budget=budget)
        return None

    def _lora_name(self, model: str, metrics: list[EndpointMetrics | None]) -> str | None:
        """The LoRA adapter the request runs with: its model name, when that is a configured
        adapter or one an engine reports running or waiting (vLLM serves an adapter under
        the name it was loaded with, and announces its blocks with that ``lora_name``)."""
        if model in self._adapters:
            return model
        if model:
            for m in metrics:
                if m is not None and (model in m.running_lora or model in m.waiting_lora):
                    return model
        return None

    def _scheduling_request(
        self,
        info: RequestInfo,
        parsed: ParsedRequest,
        token_ids: Sequence[int] | None,
        lora_name: str | None = None,
    ) -> SchedulingRequest:
        bs = self.config.block_size
        # The text form of the prompt feeds only the approximate prefix scorer and, without
        # token ids, the length estimate; serialising it otherwise is wasted work.
        prefix = b""
        if self.config.prefix_text or token_ids is None:
            prefix = _prefix_text(parsed)
        if token_ids is not None:
            # The same seed the index gives blocks announced with this lora_name and salt.
            seed = hashing.chain_seed(lora_name, parsed.cache_salt)
            keys = hashing.block_hashes(token_ids, bs, seed)
            prompt_tokens = len(token_ids)
        else:
            keys = hashing.block_hashes((), bs)
            prompt_tokens = max(1, len(prefix) // 4)  # rough: ~4 bytes per token
        priority = parsed.priority
        if priority is None:
            priority = self._objective_priority(info)
        return SchedulingRequest(
            request_id=info.request_id,
            model=parsed.model,
            block_keys=keys,
            prompt_tokens=prompt_tokens,
            block_size=bs,
            prefix_text=prefix,
            priority=priority,
            osl=parsed.osl,
            cache_salt=parsed.cache_salt,
        )

    @staticmethod
    def _objective_priority(info: RequestInfo) -> int:
        # Without InferenceObjective objects (Kubernetes discovery), the objective header
        # can only carry a number; names map to priority 0 as in the reference EPP.
        for name in H.OBJECTIVE:
            value = info.headers.get(name)
            if value:
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    def _worker_headers(self, worker: Worker) -> list[tuple[str, str]]:
        return [
            (H.WORKER_INSTANCE_ID, str(H.worker_instance_id(worker[0]))),
            (H.DP_RANK, str(worker[1])),
        ]

    def _apply(self, info: RequestInfo, prepared: _Prepared, decision: Decision) -> Routed:
        req = prepared.request
        targets = decision.decode.targets
        primary = targets[0]
        addresses: list[str] = []
        for target in targets:
            if target.address not in addresses:
                addresses.append(target.address)
        destination = ",".join(addresses)
        set_headers = self._worker_headers(primary.worker)
        exchange = _Exchange(
            request_id=req.request_id,
            model=req.model,
            worker=primary.worker,
            request=req,
            decision=decision,
        )
        exchange.conformance = self.config.served_verifier
        bs = req.block_size
        if decision.prefill is not None:
            pre = decision.prefill.targets[0]
            set_headers.append((H.PREFILLER_HOST_PORT, pre.address))
            set_headers.append((H.PREFILL_DP_RANK, str(pre.dp_rank)))
            set_headers.append((H.ROUTING_MODE, "disaggregated"))
            # No decode blocks on the prefill worker: its KV leaves for the decode worker.
            exchange.prefill_booking = self.load.book(
                req.request_id,
                pre.worker,
                (),
                req.prompt_tokens,
                pre.overlap.depth * bs,
                prefill=True,
            )
            exchange.bookings.append(
                self.load.book(
                    req.request_id,
                    primary.worker,
                    req.block_keys,
                    req.prompt_tokens,
                    0,
                    prefill=False,
                )
            )
        else:
            set_headers.append((H.ROUTING_MODE, "aggregated"))
            exchange.bookings.append(
                self.load.book(
                    req.request_id,
                    primary.worker,
                    req.block_keys,
                    req.prompt_tokens,
                    min(primary.overlap.depth * bs, req.prompt_tokens),
                    prefill=True,
                )
            )
        body = prepared.body
        if body is None and info.body is not None:
            body = self._forwarded_body(prepared.parsed, prepared.token_ids, info.body)
        return Routed(
            destination=destination,
            set_headers=set_headers,
            body=body,
            state=exchange,
            body_messages=prepared.body_messages,
        )

    def _forwarded_body(
        self,
        parsed: ParsedRequest,
        token_ids: Sequence[int] | None,
        original: bytes | bytearray,
    ) -> bytes | None:
        """The body with the prompt's ids in ``nvext.token_data``; None to pass it as is.

        Without an ``nvext`` of its own, the client's bytes are kept and the field appended
        before the closing brace (the rest of the body is not encoded again, which for a
        large body is most of the work); otherwise the document is encoded anew."""
        if not self.config.token_data or token_ids is None:
            return None
        doc = parsed.body
        if "nvext" not in doc:
            end = len(original)
            while end and original[end - 1] in b" \t\r\n":
                end -= 1
            if end and original[end - 1] == 0x7D:  # b"}": what a parsed object ends with
                return b"".join(
                    (
                        memoryview(original)[: end - 1],
                        b',"nvext":{"token_data":' if doc else b'"nvext":{"token_data":',
                        _encode_json(token_ids),
                        b"}}",
                    )
                )
        # The parsed body is this request's own object and is not read again: extend it in
        # place rather than copying it (or the token ids) first.
        nvext = doc.get("nvext")
        if not isinstance(nvext, dict):
            nvext = doc["nvext"] = {}
        nvext["token_data"] = token_ids
        return _encode_json(doc)

    # ------------------------------------------------------------- logging

    def _candidate_records(
        self, result: ProfileResult | None, by_worker: dict[Worker, Candidate]
    ) -> list[CandidateRecord]:
        if result is None:
            return []
        out = []
        for score in result.scores:
            cand = by_worker.get(score.worker)
            if cand is None:
                continue
            ep = self.pool.endpoint(cand.address)
            m = cand.metrics
            out.append(
                CandidateRecord(
                    worker=worker_label(cand.worker, ep.dp_size if ep else 1),
                    role=cand.role,
                    cached_blocks=cand.overlap.depth,
                    cached_by_tier={
                        n: v for n, v in zip(_TIER_NAMES, cand.overlap, strict=True) if v
                    },
                    prefill_tokens=cand.load.prefill_tokens,
                    decode_blocks=cand.load.decode_blocks,
                    requests=cand.load.requests,
                    waiting=None if m is None else m.waiting,
                    kv_usage=None if m is None else m.kv_usage,
                    score=score.score,
                    cost=score.cost,
                    parts=dict(score.parts),
                )
            )
        return out

    def _label(self, worker: Worker) -> str:
        ep = self.pool.endpoint(worker[0])
        return worker_label(worker, ep.dp_size if ep else 1)

    def _record(
        self,
        req: SchedulingRequest,
        decision: Decision,
        destination: str,
        elapsed: float,
        candidates: list[Candidate],
    ) -> None:
        primary = decision.decode.targets[0]
        prefill = None
        if decision.prefill is not None:
            prefill = self._label(decision.prefill.targets[0].worker)
        label = self._label

        def rank() -> Ranked:
            depth = {c.worker: c.overlap.depth for c in candidates}
            return [
                (label(s.worker), s.score, s.cost, depth.get(s.worker, 0))
                for s in sorted(decision.decode.scores, key=lambda s: -s.score)
            ]

        def build() -> tuple[list[CandidateRecord], list[CandidateRecord]]:
            by_worker = {c.worker: c for c in candidates}
            return (
                self._candidate_records(decision.decode, by_worker),
                self._candidate_records(decision.prefill, by_worker),
            )

        record = DecisionRecord(
            request_id=req.request_id,
            model=req.model,
            mode=decision.mode,
            destination=destination,
            chosen=label(primary.worker),
            prefill=prefill,
            prompt_tokens=req.prompt_tokens,
            prompt_blocks=len(req.block_keys),
            elapsed_ms=round(elapsed, 3),
            rank=rank,
            build=build,
        )
        self.decisions.add(record)
        if log.isEnabledFor(logging.INFO):
            log.info("%s", record.log_line())

    # ------------------------------------------------------- response hooks

    def response_headers(
        self, routed: Routed, status: int, served: str | None, streaming: bool
    ) -> list[tuple[str, str]]:
        exchange: _Exchange = routed.state
        if served and exchange.bookings:
            first = served.split(",", 1)[0].strip()
            if first != exchange.worker[0]:
                M.SERVED_MISMATCH.inc()
                ep = self.pool.endpoint(first)
                rank = exchange.worker[1]
                worker = (first, rank if ep is not None and rank < ep.dp_size else 0)
                for booking in exchange.bookings:
                    self.load.move(booking, worker)
                exchange.worker = worker
                if exchange.request is not None and exchange.decision is not None:
                    # The served endpoint, not the pick, now holds the prompt's prefix.
                    self.scheduler.after_pick(exchange.request, exchange.decision, served=worker)
        if exchange.conformance:
            value = served or f"fail: missing {H.DESTINATION_SERVED}"
            return [(H.CONFORMANCE_SERVED, value)]
        return []

    def first_byte(self, routed: Routed) -> None:
        exchange: _Exchange = routed.state
        for booking in exchange.bookings:
            self.load.prefill_done(booking)
        if exchange.prefill_booking is not None:
            self.load.free(exchange.prefill_booking)

    def finished(self, routed: Routed, outcome: str, usage: Usage | None = None) -> None:
        exchange: _Exchange = routed.state
        freed = False
        for booking in exchange.bookings:
            freed = self.load.free(booking) or freed
        if exchange.prefill_booking is not None:
            self.load.free(exchange.prefill_booking)
        if exchange.model and freed:
            M.RUNNING.labels(exchange.model).dec()
        if outcome != "complete" and exchange.model:
            M.REQUEST_ERRORS.labels(exchange.model, exchange.model, outcome).inc()
        duration = self.clock() - exchange.started
        M.REQUEST_DURATION.labels(exchange.model, exchange.model).observe(duration)
        if usage is not None and exchange.model:
            labels = (exchange.model, exchange.model)
            M.INPUT_TOKENS.labels(*labels).observe(usage.prompt_tokens)
            M.OUTPUT_TOKENS.labels(*labels).observe(usage.completion_tokens)
            if usage.cached_tokens is not None:
                M.PROMPT_CACHED_TOKENS.labels(*labels).observe(usage.cached_tokens)
            if usage.completion_tokens > 0:
                M.NTPOT.labels(*labels).observe(duration / usage.completion_tokens)

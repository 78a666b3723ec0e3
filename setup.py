"""Build configuration for the one compiled part of kvpick (everything else is pyproject.toml).

``epp._kvnative`` is optional: when it cannot be compiled, the install goes on and kvpick
uses the pure-Python equivalents in ``epp/native.py``, slower but identical in behaviour.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "epp._kvnative",
            sources=["epp/native/module.c"],
            depends=[
                "epp/native/batch_decode.h",
                "epp/native/msgpack_arrays.h",
                "epp/native/u64map.h",
                "epp/native/xxh3.h",
            ],
            extra_compile_args=[
                "-O2",
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Wno-unused-parameter",
                "-Wno-missing-field-initializers",
                "-Wno-cast-function-type",
            ],
            optional=True,
        )
    ]
)

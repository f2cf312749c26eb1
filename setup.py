"""The optional C extension ``mobilenet._fused_kernels`` (the fused block kernel of :mod:`mobilenet.fused`).

Everything else about the package is in pyproject.toml. ``optional=True``: where no C compiler is found the build
only warns and the package installs without the extension (``mobilenet.fused.fused_available()`` is then False).
Per-function ``target`` attributes pick AVX-512/AVX2 at run time, so no ``-march`` flag: the wheel runs on any
x86-64 CPU.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mobilenet._fused_kernels",
            sources=["src/mobilenet/_fused/fused.c"],
            depends=[
                "src/mobilenet/_fused/fused_impl.h",
                "src/mobilenet/_fused/fused_int8.h",
                "src/mobilenet/_fused/fused_undef.h",
            ],
            extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-Wall", "-Wno-unused-function"],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)

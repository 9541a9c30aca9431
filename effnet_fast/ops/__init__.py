"""Fused ops: kernel-level ops per backend and the differentiable ops built on them."""
from .backends import BACKENDS, build_info, kernels, resolve_backend
from .dwconv_bn_silu import dwconv_bn_silu, dwconv_bn_silu_fn
from .squeeze_excite import squeeze_excite, squeeze_excite_fn, squeeze_excite_project, squeeze_excite_project_fn

__all__ = ["BACKENDS", "build_info", "kernels", "resolve_backend", "dwconv_bn_silu", "dwconv_bn_silu_fn",
           "squeeze_excite", "squeeze_excite_fn", "squeeze_excite_project", "squeeze_excite_project_fn"]

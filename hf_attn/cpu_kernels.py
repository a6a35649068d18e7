"""Fused C++ kernels for the CPU training step: RMSNorm, the SwiGLU gate and the rotary rotation.

On the CPU, torch has no fused kernels for these three (it has them for LayerNorm and GELU), so the
PyTorch expressions of ``fused_ops.py`` and ``attention_rope.py`` make 3 to 9 passes over each
tensor. These kernels make one pass per direction (vectorised with ATen's ``Vectorized``, rows split
across torch's threads) and compute the same values up to float rounding (tests compare them with the
plain expressions, in float64 as well).

When they run: float32 / float64 CPU tensors, while gradients are recorded and nothing traces the
model (``torch.compile`` and ``torch.export`` fuse the plain ops themselves). A backward that builds
a graph (double backward) uses the differentiable PyTorch ops instead.

Build: compiled once per machine with ``torch.utils.cpp_extension.load_inline`` (a C++ compiler and
about 40 s with g++ on first use; cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``)
when the first training step needs them. The environment variable ``HF_ATTN_CPU_KERNELS`` chooses:

- ``auto`` (default): build on first use; if the build fails, warn once and use the PyTorch ops;
- ``1``: build on first use and raise if the build fails;
- ``0``: never build or use them (the PyTorch ops).

The source lives in this file, so checkpoints saved with their code (``trust_remote_code``) carry it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import warnings

import torch

ENV_VAR = "HF_ATTN_CPU_KERNELS"
CHOICES = {"auto": "auto", "": "auto", "1": "on", "on": "on", "true": "on", "0": "off", "off": "off", "false": "off"}

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <optional>
#include <vector>

using at::vec::Vectorized;

namespace {

// Rows per task for at::parallel_for: about 32k elements each.
int64_t grain(int64_t width) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)); }

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.is_contiguous(), name, " must be a contiguous (rows, width) tensor");
}

// ---------------------------------------------------------------- RMSNorm
// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps) per row
std::vector<torch::Tensor> rms_norm_fwd(torch::Tensor x, torch::Tensor w, double eps) {
  check_rows(x, "x");
  const int64_t R = x.size(0), C = x.size(1);
  TORCH_CHECK(w.numel() == C && w.is_contiguous() && w.scalar_type() == x.scalar_type(), "weight must be (C,) of x's dtype");
  auto y = torch::empty_like(x);
  auto rstd = torch::empty({R, 1}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_fwd", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    scalar_t* rp = rstd.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain(C), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * C;
        scalar_t* yr = yp + r * C;
        V acc(0);
        int64_t j = 0;
        for (; j + n <= C; j += n) { V v = V::loadu(xr + j); acc = at::vec::fmadd(v, v, acc); }
        if (j < C) { V v = V::loadu(xr + j, C - j); acc = at::vec::fmadd(v, v, acc); }
        scalar_t inv = scalar_t(1) / std::sqrt(at::vec::vec_reduce_all<scalar_t>(
            [](V a, V b) { return a + b; }, acc) / scalar_t(C) + scalar_t(eps));
        rp[r] = inv;
        V s(inv);
        for (j = 0; j + n <= C; j += n) (V::loadu(xr + j) * s * V::loadu(wp + j)).store(yr + j);
        if (j < C) (V::loadu(xr + j, C - j) * s * V::loadu(wp + j, C - j)).store(yr + j, C - j);
      }
    });
  });
  return {y, rstd};
}

// grad_x = rstd * (g*w - xhat * mean(g*w*xhat)), xhat = x * rstd;  grad_w = sum over rows of g * xhat
std::vector<torch::Tensor> rms_norm_bwd(torch::Tensor grad, torch::Tensor x, torch::Tensor w, torch::Tensor rstd,
                                        bool need_x, bool need_w) {
  check_rows(grad, "grad");
  check_rows(x, "x");
  const int64_t R = x.size(0), C = x.size(1);
  torch::Tensor gx = need_x ? torch::empty_like(x) : torch::Tensor();
  torch::Tensor gw;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rms_norm_bwd", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* rp = rstd.data_ptr<scalar_t>();
    scalar_t* gxp = need_x ? gx.data_ptr<scalar_t>() : nullptr;
    const int threads = at::get_num_threads();
    // per thread: double sums of blocks of 64 rows summed in scalar_t (exact for float64)
    std::vector<double> partial(need_w ? size_t(threads) * C : 0, 0.0);
    at::parallel_for(0, R, grain(C), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> block(need_w ? C : 0, scalar_t(0));
      double* mine = need_w ? partial.data() + size_t(at::get_thread_num()) * C : nullptr;
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = gp + r * C;
        const scalar_t* xr = xp + r * C;
        const V s(rp[r]);
        if (need_w) {
          scalar_t* b = block.data();
          int64_t j = 0;
          for (; j + n <= C; j += n) at::vec::fmadd(V::loadu(g + j), V::loadu(xr + j) * s, V::loadu(b + j)).store(b + j);
          if (j < C) at::vec::fmadd(V::loadu(g + j, C - j), V::loadu(xr + j, C - j) * s, V::loadu(b + j, C - j)).store(b + j, C - j);
          if ((r - begin) % 64 == 63 || r + 1 == end) {
            for (int64_t c = 0; c < C; ++c) { mine[c] += double(b[c]); b[c] = scalar_t(0); }
          }
        }
        if (need_x) {
          V acc(0);
          int64_t j = 0;
          for (; j + n <= C; j += n) acc = at::vec::fmadd(V::loadu(g + j) * V::loadu(wp + j), V::loadu(xr + j), acc);
          if (j < C) acc = at::vec::fmadd(V::loadu(g + j, C - j) * V::loadu(wp + j, C - j), V::loadu(xr + j, C - j), acc);
          const scalar_t inv = rp[r];
          // mean(g w xhat) = rstd * sum(g w x) / C;  grad_x = rstd * g w - x * rstd^3 * sum(g w x) / C
          const scalar_t dot = at::vec::vec_reduce_all<scalar_t>([](V a, V b) { return a + b; }, acc);
          const V k(-inv * inv * inv * dot / scalar_t(C));
          scalar_t* o = gxp + r * C;
          for (j = 0; j + n <= C; j += n)
            at::vec::fmadd(V::loadu(xr + j), k, V::loadu(g + j) * V::loadu(wp + j) * s).store(o + j);
          if (j < C)
            at::vec::fmadd(V::loadu(xr + j, C - j), k, V::loadu(g + j, C - j) * V::loadu(wp + j, C - j) * s).store(o + j, C - j);
        }
      }
    });
    if (need_w) {
      gw = torch::empty({C}, x.options());
      scalar_t* o = gw.data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        double total = 0.0;
        for (int t = 0; t < threads; ++t) total += partial[size_t(t) * C + c];
        o[c] = scalar_t(total);
      }
    }
  });
  return {gx, gw};
}

// ---------------------------------------------------------------- SwiGLU: silu(gate) * up
template <typename V>
inline V sigmoid(const V& g) { return V(1) / (V(1) + g.neg().exp()); }

// product (R, I) of gate_up = [gate | up] (R, 2I)
torch::Tensor swiglu_fwd(torch::Tensor gate_up) {
  check_rows(gate_up, "gate_up");
  const int64_t R = gate_up.size(0), I = gate_up.size(1) / 2;
  auto out = torch::empty({R, I}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES(gate_up.scalar_type(), "swiglu_fwd", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size();
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, R, grain(2 * I), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * I;
        const scalar_t* u = g + I;
        scalar_t* p = op + r * I;
        for (int64_t j = 0; j < I; j += n) {
          const int64_t m = std::min(n, I - j);
          V gv = V::loadu(g + j, m);
          (gv * sigmoid(gv) * V::loadu(u + j, m)).store(p + j, m);
        }
      }
    });
  });
  return out;
}

// Writes d(silu(gate) * up)/d[gate | up] for grad (R, I) into grad_gate_up (R, 2I) and, when
// defined, the product silu(gate) * up into product (R, I).
void swiglu_bwd(torch::Tensor gate_up, torch::Tensor grad, torch::Tensor grad_gate_up,
                std::optional<torch::Tensor> product) {
  check_rows(gate_up, "gate_up");
  check_rows(grad, "grad");
  check_rows(grad_gate_up, "grad_gate_up");
  const bool keep = product.has_value();
  if (keep) check_rows(*product, "product");
  const int64_t R = gate_up.size(0), I = gate_up.size(1) / 2;
  AT_DISPATCH_FLOATING_TYPES(gate_up.scalar_type(), "swiglu_bwd", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size();
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    scalar_t* d = grad_gate_up.data_ptr<scalar_t>();
    scalar_t* po = keep ? product->data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, R, grain(3 * I), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* g = in + r * 2 * I;
        const scalar_t* u = g + I;
        const scalar_t* gp = gr + r * I;
        scalar_t* dg = d + r * 2 * I;
        scalar_t* du = dg + I;
        for (int64_t j = 0; j < I; j += n) {
          const int64_t m = std::min(n, I - j);
          V gv = V::loadu(g + j, m), uv = V::loadu(u + j, m), gpv = V::loadu(gp + j, m);
          V s = sigmoid(gv);
          V silu = gv * s;
          (gpv * silu).store(du + j, m);
          (gpv * uv * s * (V(1) + gv * (V(1) - s))).store(dg + j, m);
          if (keep) (silu * uv).store(po + r * I + j, m);
        }
      }
    });
  });
}

// ---------------------------------------------------------------- rotary
// x (B, h, L, D) of any strides with a unit last stride; cos, sin (B, >= h or broadcast, L, >= D/2):
// out1 = x1 cos - sign x2 sin, out2 = x2 cos + sign x1 sin (cos, sin: the first D/2 of each row).
torch::Tensor rotate(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, double sign) {
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 4 && sin.dim() == 4, "x, cos and sin must be 4-D");
  TORCH_CHECK(x.stride(3) == 1 && cos.stride(3) == 1 && sin.stride(3) == 1, "the last axis must be contiguous");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), half = D / 2;
  for (const auto& t : {cos, sin}) {
    TORCH_CHECK((t.size(0) == B || t.size(0) == 1) && (t.size(1) >= H || t.size(1) == 1) && t.size(2) == L
                && t.size(3) >= half, "cos/sin must be (B or 1, >= h or 1, L, >= D/2)");
  }
  // a size-1 batch or head axis of cos/sin is broadcast
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), ch = cos.size(1) == 1 ? 0 : cos.stride(1);
  const int64_t sb = sin.size(0) == 1 ? 0 : sin.stride(0), sh = sin.size(1) == 1 ? 0 : sin.stride(1);
  auto out = torch::empty_like(x);  // keeps x's strides when x is dense
  const int64_t xb = x.stride(0), xh = x.stride(1), xl = x.stride(2), cl = cos.stride(2), sl = sin.stride(2);
  const int64_t ob = out.stride(0), oh = out.stride(1), ol = out.stride(2);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rotate", [&] {
    using V = Vectorized<scalar_t>;
    const int64_t n = V::size();
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const V sg(static_cast<scalar_t>(sign));
    at::parallel_for(0, B * H, grain(L * D), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // one (batch, head) plane of L rows per step
        const int64_t b = i / H, h = i % H;
        const scalar_t* xi = xp + b * xb + h * xh;
        scalar_t* oi = op + b * ob + h * oh;
        const scalar_t* ci = cp + b * cb + h * ch;
        const scalar_t* si = sp + b * sb + h * sh;
        for (int64_t l = 0; l < L; ++l) {
          const scalar_t* x1 = xi + l * xl;
          const scalar_t* x2 = x1 + half;
          scalar_t* o1 = oi + l * ol;
          scalar_t* o2 = o1 + half;
          const scalar_t* c = ci + l * cl;
          const scalar_t* s = si + l * sl;
          for (int64_t j = 0; j < half; j += n) {
            const int64_t m = std::min(n, half - j);
            V a = V::loadu(x1 + j, m), z = V::loadu(x2 + j, m), cv = V::loadu(c + j, m), sv = V::loadu(s + j, m) * sg;
            at::vec::fnmadd(z, sv, a * cv).store(o1 + j, m);
            at::vec::fmadd(a, sv, z * cv).store(o2 + j, m);
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
  m.def("rotate", &rotate);
}
"""

# Compiler flags for the vector width torch itself selected on this CPU (ATen's CPU_CAPABILITY).
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512",
               "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}

_state: dict = {}  # "module": the loaded extension, or None after a failed build; "error": its reason
_DTYPES = (torch.float32, torch.float64)


def choice() -> str:
    """``HF_ATTN_CPU_KERNELS`` read as ``"auto"``, ``"on"`` or ``"off"``; anything else raises."""
    raw = os.environ.get(ENV_VAR, "auto")
    value = CHOICES.get(raw.strip().lower())
    if value is None:
        raise ValueError(f"{ENV_VAR}={raw!r} is not understood; allowed values: 'auto' (default), '1', '0'")
    return value


def _build():
    from torch.utils.cpp_extension import load_inline

    capability = torch.backends.cpu.get_cpu_capability() if platform.machine() in ("x86_64", "AMD64") else "DEFAULT"
    flags = ["-O3"] + _CAPABILITY_FLAGS.get(capability, [])
    digest = hashlib.sha256((_SOURCE + " ".join(flags) + torch.__version__).encode()).hexdigest()[:12]
    return load_inline(
        name=f"hf_attn_cpu_{capability.lower()}_{digest}",
        cpp_sources=_SOURCE,
        extra_cflags=flags,
        verbose=False,
    )


def kernels():
    """The compiled extension (built on the first call), or ``None`` when ``HF_ATTN_CPU_KERNELS=0``
    or the build failed under ``auto`` (warned once)."""
    mode = choice()
    if mode == "off":
        return None
    if "module" not in _state:
        try:
            _state["module"] = _build()
        except Exception as error:  # no compiler, headers or write access: the PyTorch ops serve instead
            _state["module"], _state["error"] = None, f"{type(error).__name__}: {error}"
            if mode == "auto":
                warnings.warn(f"hf_attn: the fused CPU kernels could not be built ({_state['error']}); using the "
                              f"PyTorch ops. Set {ENV_VAR}=0 to skip the build.", RuntimeWarning, stacklevel=2)
    if _state["module"] is None and mode == "on":
        raise RuntimeError(f"{ENV_VAR}=1 but the fused CPU kernels could not be built: {_state['error']}")
    return _state["module"]


def usable(*tensors: torch.Tensor):
    """The extension when every tensor is a float32/float64 CPU tensor of one dtype and nothing traces
    the model; else ``None``. Builds the extension on the first call that needs it."""
    first = tensors[0]
    if (first.device.type != "cpu" or first.dtype not in _DTYPES or torch.compiler.is_compiling()
            or torch.jit.is_tracing()):
        return None
    if any(t.device.type != "cpu" or t.dtype != first.dtype for t in tensors[1:]):
        return None
    return kernels()


def describe() -> str:
    """One line for logs and reports: the switch and what it gave (builds the kernels if needed)."""
    mode = choice()
    if mode == "off":
        return f"{ENV_VAR}=0: PyTorch ops"
    module = kernels()
    found = f"built ({module.__name__})" if module is not None else f"unavailable ({_state['error']})"
    return f"{ENV_VAR}={os.environ.get(ENV_VAR, 'auto')}: {found}"


@contextlib.contextmanager
def switched(value: str):
    """``HF_ATTN_CPU_KERNELS=value`` inside the block (e.g. ``"0"`` to time the PyTorch ops), restored after."""
    before = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = value
    try:
        choice()  # validates the value
        yield
    finally:
        if before is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = before

"""Fused C++ kernels for the CPU training step: RMSNorm, the SwiGLU gate and the rotary rotation.

On the CPU, torch has no fused kernels for these three (it has them for LayerNorm and GELU), so the
PyTorch expressions of ``fused_ops.py`` and ``attention_rope.py`` make 3 to 9 passes over each
tensor. These kernels make one pass per direction (vectorised with ATen's ``Vectorized``, rows split
across torch's threads) and compute the same values up to float rounding (tests compare them with the
plain expressions, in float64 as well).

The training step calls them through C++ autograd nodes (``rms_norm_node``, ``swiglu_linear_node``
for SwiGLU with ``down_proj``, ``rotate_pair_node``, and ``split_rotate_node``, which takes the stacked
q/k/v projection to rotated q, k and v and writes its whole gradient in one pass), so neither the
forward nor the backward of these ops runs Python. A backward that builds a graph (double backward)
computes with differentiable ATen ops instead of the kernels.

When they run: float32 / float64 CPU tensors, while gradients are recorded and nothing traces the
model (``torch.compile`` and ``torch.export`` fuse the plain ops themselves).

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
// out1 = x1 cos - sign x2 sin, out2 = x2 cos + sign x1 sin (cos, sin: the first D/2 of each row),
// written into out (x's shape, any strides with a unit last stride).
void rotate_into(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, double sign,
                 const torch::Tensor& out) {
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
  TORCH_CHECK(out.sizes() == x.sizes() && out.stride(3) == 1 && out.scalar_type() == x.scalar_type(),
              "out must have x's shape and dtype and a unit last stride");
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
}

// rotate_into a new tensor that keeps x's order of the batch, head and position axes (empty_like does
// only for a dense x; q and k sliced from one q/k/v projection are (B, L, H, D) rows seen as (B, H, L, D))
torch::Tensor rotate(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, double sign) {
  TORCH_CHECK(x.dim() == 4, "x must be 4-D");
  auto out = x.stride(2) > x.stride(1) ? torch::empty({x.size(0), x.size(2), x.size(1), x.size(3)}, x.options()).transpose(1, 2)
                                       : torch::empty_like(x, at::MemoryFormat::Contiguous);
  rotate_into(x, cos, sin, sign, out);
  return out;
}

// ---------------------------------------------------------------- autograd nodes
// The training step's functions as C++ autograd nodes: forward and backward run with no Python per
// call. A backward that is itself recorded (create_graph=True: double backward) computes with
// differentiable ATen ops instead of the kernels.
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

torch::Tensor rows_of(const torch::Tensor& t) { return t.reshape({-1, t.size(-1)}).contiguous(); }

torch::Tensor unit_last(const torch::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

struct RMSNormNode : public torch::autograd::Function<RMSNormNode> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor x, torch::Tensor w, double eps) {
    auto out = rms_norm_fwd(rows_of(x), w.contiguous(), eps);
    ctx->save_for_backward({x, w, out[1]});
    ctx->saved_data["eps"] = eps;
    return out[0].view(x.sizes());
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor x = saved[0], w = saved[1];
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const torch::Tensor rows = rows_of(x), g = rows_of(grads[0]);
    torch::Tensor gx, gw;
    if (at::GradMode::is_enabled()) {  // rstd as a function of x
      auto rstd = (rows.square().mean(-1, true) + ctx->saved_data["eps"].toDouble()).rsqrt();
      auto normed = rows * rstd;
      if (need_w) gw = (g * normed).sum(0);
      if (need_x) {
        auto gn = g * w;
        auto mean = (gn * normed).sum(-1, true) / double(rows.size(1));
        gx = ((gn - normed * mean) * rstd).view(x.sizes());
      }
    } else {
      auto out = rms_norm_bwd(g, rows, w.contiguous(), saved[2], need_x, need_w);
      if (need_x) gx = out[0].view(x.sizes());
      if (need_w) gw = out[1];
    }
    return {gx, gw, torch::Tensor()};
  }
};

// down(silu(gate) * up) with down's weight (C, I): keeps gate_up only; the backward recomputes the
// product, ``slice`` rows at a time (bounding its temporaries to (slice, I))
struct SwiGLULinearNode : public torch::autograd::Function<SwiGLULinearNode> {
  static torch::Tensor forward(AutogradContext* ctx, torch::Tensor gate_up, torch::Tensor weight, int64_t slice) {
    TORCH_CHECK(slice > 0, "slice must be positive");
    ctx->save_for_backward({gate_up, weight});
    ctx->saved_data["slice"] = slice;
    auto shape = gate_up.sizes().vec();
    shape.back() = weight.size(0);
    return at::linear(swiglu_fwd(rows_of(gate_up)), weight).view(shape);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor gate_up = saved[0], weight = saved[1];
    const bool need_in = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const torch::Tensor rows = rows_of(gate_up), g = rows_of(grads[0]);
    const int64_t R = rows.size(0), I = rows.size(1) / 2;
    torch::Tensor gi, gw;
    if (at::GradMode::is_enabled()) {
      auto parts = rows.chunk(2, -1);
      auto sig = parts[0].sigmoid();
      auto silu = parts[0] * sig;
      auto gp = g.mm(weight);
      if (need_in) gi = at::cat({gp * parts[1] * sig * (1 + parts[0] * (1 - sig)), gp * silu}, -1).view(gate_up.sizes());
      if (need_w) gw = g.t().mm(silu * parts[1]);
      return {gi, gw, torch::Tensor()};
    }
    const int64_t slice = ctx->saved_data["slice"].toInt();
    if (need_in) gi = torch::empty_like(rows);
    for (int64_t s = 0; s < R; s += slice) {
      const int64_t len = std::min(slice, R - s);
      const torch::Tensor gs = g.narrow(0, s, len), part = rows.narrow(0, s, len);
      torch::Tensor product;
      if (need_in) {
        std::optional<torch::Tensor> keep;
        if (need_w) keep = torch::empty({len, I}, rows.options());
        swiglu_bwd(part, gs.mm(weight), gi.narrow(0, s, len), keep);
        if (need_w) product = *keep;
      } else {
        product = swiglu_fwd(part);
      }
      if (need_w) gw = gw.defined() ? gw.addmm_(gs.t(), product) : gs.t().mm(product);
    }
    return {need_in ? gi.view(gate_up.sizes()) : gi, gw, torch::Tensor()};
  }
};

// The rotation as differentiable ATen ops (what a recorded backward computes): x (B, h, L, D), cos/sin
// (B or 1, 1, L, D) with equal halves.
torch::Tensor rotate_ops(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, double sign) {
  const int64_t half = x.size(-1) / 2;
  auto c = cos.narrow(-1, 0, half), s = sin.narrow(-1, 0, half) * sign;
  auto x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

// q (B, H, L, D) and k (B, Hkv, L, D) rotated by the angles of cos/sin (B or 1, 1, L, D); keeps cos/sin only
struct RotatePairNode : public torch::autograd::Function<RotatePairNode> {
  static variable_list forward(AutogradContext* ctx, torch::Tensor q, torch::Tensor k, torch::Tensor cos,
                               torch::Tensor sin) {
    ctx->save_for_backward({cos, sin});
    return {rotate(unit_last(q), cos, sin, 1.0), rotate(unit_last(k), cos, sin, 1.0)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor cos = saved[0], sin = saved[1];
    variable_list out{torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    for (int i = 0; i < 2; ++i) {
      if (!ctx->needs_input_grad(i)) continue;
      // the rotation by the opposite angle
      out[i] = at::GradMode::is_enabled() ? rotate_ops(grads[i], cos, sin, -1.0) : rotate(unit_last(grads[i]), cos, sin, -1.0);
    }
    return out;
  }
};

// The (B, L, (H + 2 Hkv) D) output of the stacked q/k/v projection -> q and k rotated, (B, H, L, D) and
// (B, Hkv, L, D) in the projection's (B, L, heads, D) order, and v, a view of it. The backward writes
// the gradient of all three into one (B, L, (H + 2 Hkv) D) tensor, the q and k parts rotated back on the
// way: no separate rotated gradients, no concatenation. Keeps cos/sin (B or 1, 1, L, D) only.
struct SplitRotateNode : public torch::autograd::Function<SplitRotateNode> {
  static std::vector<torch::Tensor> heads_of(const torch::Tensor& qkv, int64_t heads, int64_t kv_heads) {
    const int64_t B = qkv.size(0), L = qkv.size(1), D = qkv.size(2) / (heads + 2 * kv_heads);
    std::vector<torch::Tensor> out;
    int64_t start = 0;
    for (int64_t h : {heads, kv_heads, kv_heads}) {
      out.push_back(qkv.narrow(2, start, h * D).view({B, L, h, D}).transpose(1, 2));
      start += h * D;
    }
    return out;
  }

  static variable_list forward(AutogradContext* ctx, torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin,
                               int64_t heads, int64_t kv_heads) {
    TORCH_CHECK(qkv.dim() == 3 && qkv.size(2) % (heads + 2 * kv_heads) == 0, "qkv must be (B, L, (H + 2 Hkv) D)");
    ctx->save_for_backward({cos, sin});
    ctx->saved_data["heads"] = heads;
    ctx->saved_data["kv_heads"] = kv_heads;
    auto parts = heads_of(qkv, heads, kv_heads);
    // q and k rotated into (B, h, L, D)-contiguous tensors: CPU sdpa runs faster on those than on the
    // projection's (B, L, h, D) order
    auto q = torch::empty(parts[0].sizes(), qkv.options()), k = torch::empty(parts[1].sizes(), qkv.options());
    rotate_into(parts[0], cos, sin, 1.0, q);
    rotate_into(parts[1], cos, sin, 1.0, k);
    return {q, k, parts[2]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const torch::Tensor cos = saved[0], sin = saved[1];
    const int64_t heads = ctx->saved_data["heads"].toInt(), kv_heads = ctx->saved_data["kv_heads"].toInt();
    const int64_t B = grads[0].size(0), L = grads[0].size(2), D = grads[0].size(3);
    const variable_list none{torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
    variable_list out{torch::Tensor()};
    out.insert(out.end(), none.begin(), none.end());
    if (at::GradMode::is_enabled()) {  // differentiable ops: rotate back, then heads side by side again
      std::vector<torch::Tensor> parts;
      for (int i = 0; i < 3; ++i) {
        auto g = i < 2 ? rotate_ops(grads[i], cos, sin, -1.0) : grads[i];
        parts.push_back(g.transpose(1, 2).reshape({B, L, -1}));
      }
      out[0] = at::cat(parts, -1);
      return out;
    }
    auto grad = torch::empty({B, L, (heads + 2 * kv_heads) * D}, grads[0].options());
    auto parts = heads_of(grad, heads, kv_heads);
    rotate_into(unit_last(grads[0]), cos, sin, -1.0, parts[0]);
    rotate_into(unit_last(grads[1]), cos, sin, -1.0, parts[1]);
    parts[2].copy_(grads[2]);
    out[0] = grad;
    return out;
  }
};

torch::Tensor rms_norm_node(torch::Tensor x, torch::Tensor w, double eps) { return RMSNormNode::apply(x, w, eps); }

torch::Tensor swiglu_linear_node(torch::Tensor gate_up, torch::Tensor weight, int64_t slice) {
  return SwiGLULinearNode::apply(gate_up, weight, slice);
}

variable_list rotate_pair_node(torch::Tensor q, torch::Tensor k, torch::Tensor cos, torch::Tensor sin) {
  return RotatePairNode::apply(q, k, cos, sin);
}

variable_list split_rotate_node(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                                int64_t kv_heads) {
  return SplitRotateNode::apply(qkv, cos, sin, heads, kv_heads);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_fwd", &rms_norm_fwd);
  m.def("rms_norm_bwd", &rms_norm_bwd);
  m.def("swiglu_fwd", &swiglu_fwd);
  m.def("swiglu_bwd", &swiglu_bwd);
  m.def("rotate", &rotate);
  m.def("rms_norm_node", &rms_norm_node);
  m.def("swiglu_linear_node", &swiglu_linear_node);
  m.def("rotate_pair_node", &rotate_pair_node);
  m.def("split_rotate_node", &split_rotate_node);
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
    dtype = tensors[0].dtype
    if dtype not in _DTYPES or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None
    for t in tensors:  # (a plain loop: this runs for every fused op of every layer)
        if not t.is_cpu or t.dtype is not dtype:
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

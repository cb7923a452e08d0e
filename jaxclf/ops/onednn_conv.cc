// oneDNN 2-D convolution (forward, backward-data, backward-weights) as XLA FFI handlers for
// jaxclf.ops.onednn. float32, NHWC activations, HWIO weights (flax's layout: (KH, KW, C/G, O) for
// G groups, as `feature_group_count` has it; G = C is a depthwise convolution), no dilation,
// explicit (lo, hi) padding per spatial axis. See onednn.py for the Python side.
//
// Each handler takes two input buffers and writes one result:
//   fwd:          x  (N,H,W,C),   w  (KH,KW,C/G,O) -> y  (N,OH,OW,O)
//   bwd_data:     dy (N,OH,OW,O), w  (KH,KW,C/G,O) -> dx (N,H,W,C)
//   bwd_weights:  x  (N,H,W,C),   dy (N,OH,OW,O)   -> dw (KH,KW,C/G,O)
// Attributes: sh, sw (strides), pt, pb, pl, pr (padding), groups, act_any (1: let oneDNN pick the
// activation layouts too and reorder from/to NHWC; 0: activations stay NHWC, only the weights are
// in oneDNN's chosen layout).
//
// Primitives are created once per (kind, shape, attrs) and cached; creation takes milliseconds,
// execution reuses them. Scratchpads are user-managed (per-thread buffers), so concurrent calls
// of distinct or identical primitives from XLA's threads are safe (a plan whose reorder needs
// oneDNN's own scratchpad always takes the mutex). By default calls are also
// serialised by a mutex: oneDNN already uses all cores for one call, and two concurrent OpenMP
// teams on a 2-core machine only oversubscribe it (jaxclf_onednn_set_serialize(0) turns it off).
// Results are deterministic: oneDNN's CPU convolutions partition work statically for a fixed
// thread count, and nothing here depends on timing.

#include <omp.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

enum Kind : int { kFwd = 0, kBwdData = 1, kBwdWeights = 2 };

using Key = jaxclf_onednn::Int64Key<18>;
using KeyHash = jaxclf_onednn::Int64KeyHash;

// One tensor the primitive touches: its oneDNN argument id, the user's (XLA's) layout and the
// layout the primitive wants. When they differ, a reorder goes through a workspace slice.
struct Slot {
  int arg = 0;
  dnnl::memory::desc user_md, prim_md;
  bool needs_reorder = false;
  dnnl::reorder reorder;  // user->prim for inputs, prim->user for the output
  size_t ws_offset = 0;   // where the reordered copy lives in the workspace
};

struct Plan {
  dnnl::primitive prim;
  Slot in0, in1, out;
  dnnl::memory::desc scratch_md;
  size_t scratch_offset = 0;
  size_t ws_bytes = 0;
  bool serial = false;  // a reorder uses oneDNN's library-managed scratchpad: never run concurrently
  std::string impl;
};

using jaxclf_onednn::AlignUp;
using jaxclf_onednn::Engine;

std::mutex g_cache_mu;
std::unordered_map<Key, std::shared_ptr<Plan>, KeyHash>* g_cache =
    new std::unordered_map<Key, std::shared_ptr<Plan>, KeyHash>();

using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

void FinishSlot(Slot& s, bool is_output, size_t& ws, bool& serial) {
  s.needs_reorder = !(s.user_md == s.prim_md);
  if (!s.needs_reorder) return;
  auto& eng = Engine();
  auto pd = is_output ? dnnl::reorder::primitive_desc(eng, s.prim_md, eng, s.user_md)
                      : dnnl::reorder::primitive_desc(eng, s.user_md, eng, s.prim_md);
  if (pd.scratchpad_desc().get_size() > 0) serial = true;
  s.reorder = dnnl::reorder(pd);
  s.ws_offset = ws;
  ws += AlignUp(s.prim_md.get_size());
}

std::shared_ptr<Plan> MakePlan(const Key& k) {
  const int kind = static_cast<int>(k.v[0]);
  const int64_t N = k.v[1], H = k.v[2], W = k.v[3], C = k.v[4], O = k.v[5], KH = k.v[6],
                KW = k.v[7], OH = k.v[8], OW = k.v[9];
  const dnnl::memory::dims strides{k.v[10], k.v[11]}, pad_l{k.v[12], k.v[14]},
      pad_r{k.v[13], k.v[15]}, dil{0, 0};
  const bool act_any = k.v[16] != 0;
  const int64_t G = k.v[17];
  auto& eng = Engine();

  const dnnl::memory::dims src_dims{N, C, H, W}, dst_dims{N, O, OH, OW};
  const dnnl::memory::desc src_user(src_dims, dt::f32, tag::nhwc),
      dst_user(dst_dims, dt::f32, tag::nhwc);
  dnnl::memory::desc wei_user, wei_any;
  if (G == 1) {
    const dnnl::memory::dims wei_dims{O, C, KH, KW};
    wei_user = dnnl::memory::desc(wei_dims, dt::f32, tag::hwio);
    wei_any = dnnl::memory::desc(wei_dims, dt::f32, tag::any);
  } else {
    // Grouped weights are (G, O/G, C/G, KH, KW) to oneDNN. Flax stores (KH, KW, C/G, O) with
    // output channel o = g * (O/G) + og, so the element (g, og, i, h, w) sits at
    // ((h * KW + w) * (C/G) + i) * O + g * (O/G) + og: a strided view, no copy.
    const int64_t OG = O / G, CG = C / G;
    const dnnl::memory::dims wei_dims{G, OG, CG, KH, KW};
    wei_user = dnnl::memory::desc(wei_dims, dt::f32,
                                  dnnl::memory::dims{OG, 1, O, KW * CG * O, CG * O});
    wei_any = dnnl::memory::desc(wei_dims, dt::f32, tag::any);
  }
  const tag atag = act_any ? tag::any : tag::nhwc;
  const dnnl::memory::desc src_any(src_dims, dt::f32, atag), dst_any(dst_dims, dt::f32, atag);

  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  auto plan = std::make_shared<Plan>();
  size_t ws = 0;
  const auto alg = dnnl::algorithm::convolution_direct;
  if (kind == kFwd) {
    dnnl::convolution_forward::primitive_desc pd(eng, dnnl::prop_kind::forward_training, alg,
                                                 src_any, wei_any, dst_any, strides, dil, pad_l,
                                                 pad_r, attr);
    plan->prim = dnnl::convolution_forward(pd);
    plan->in0 = {DNNL_ARG_SRC, src_user, pd.src_desc()};
    plan->in1 = {DNNL_ARG_WEIGHTS, wei_user, pd.weights_desc()};
    plan->out = {DNNL_ARG_DST, dst_user, pd.dst_desc()};
    plan->impl = pd.impl_info_str();
    plan->scratch_md = pd.scratchpad_desc();
  } else {
    dnnl::convolution_forward::primitive_desc hint(eng, dnnl::prop_kind::forward_training, alg,
                                                   src_any, wei_any, dst_any, strides, dil,
                                                   pad_l, pad_r);
    if (kind == kBwdData) {
      dnnl::convolution_backward_data::primitive_desc pd(eng, alg, src_any, wei_any, dst_any,
                                                         strides, dil, pad_l, pad_r, hint, attr);
      plan->prim = dnnl::convolution_backward_data(pd);
      plan->in0 = {DNNL_ARG_DIFF_DST, dst_user, pd.diff_dst_desc()};
      plan->in1 = {DNNL_ARG_WEIGHTS, wei_user, pd.weights_desc()};
      plan->out = {DNNL_ARG_DIFF_SRC, src_user, pd.diff_src_desc()};
      plan->impl = pd.impl_info_str();
      plan->scratch_md = pd.scratchpad_desc();
    } else {
      dnnl::convolution_backward_weights::primitive_desc pd(eng, alg, src_any, wei_any, dst_any,
                                                            strides, dil, pad_l, pad_r, hint,
                                                            attr);
      plan->prim = dnnl::convolution_backward_weights(pd);
      plan->in0 = {DNNL_ARG_SRC, src_user, pd.src_desc()};
      plan->in1 = {DNNL_ARG_DIFF_DST, dst_user, pd.diff_dst_desc()};
      plan->out = {DNNL_ARG_DIFF_WEIGHTS, wei_user, pd.diff_weights_desc()};
      plan->impl = pd.impl_info_str();
      plan->scratch_md = pd.scratchpad_desc();
    }
  }
  // One workspace: the three reorder slots, then the primitive's scratchpad.
  FinishSlot(plan->in0, false, ws, plan->serial);
  FinishSlot(plan->in1, false, ws, plan->serial);
  FinishSlot(plan->out, true, ws, plan->serial);
  plan->scratch_offset = ws;
  ws += AlignUp(plan->scratch_md.get_size());
  plan->ws_bytes = ws;
  return plan;
}

std::shared_ptr<Plan> GetPlan(const Key& k) {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  auto it = g_cache->find(k);
  if (it != g_cache->end()) return it->second;
  auto plan = MakePlan(k);  // under the lock: creation is rare, and this keeps it simple
  g_cache->emplace(k, plan);
  return plan;
}

void Execute(const Plan& plan, void* in0, void* in1, void* out) {
  auto& eng = Engine();
  char* ws = jaxclf_onednn::ThreadWorkspace().Get(plan.ws_bytes);
  dnnl::stream strm(eng);
  std::unordered_map<int, dnnl::memory> args;
  void* user_ptrs[3] = {in0, in1, out};
  const Slot* slots[3] = {&plan.in0, &plan.in1, &plan.out};
  for (int i = 0; i < 2; ++i) {
    const Slot& s = *slots[i];
    dnnl::memory user(s.user_md, eng, user_ptrs[i]);
    if (s.needs_reorder) {
      dnnl::memory prim(s.prim_md, eng, ws + s.ws_offset);
      s.reorder.execute(strm, user, prim);
      args.emplace(s.arg, prim);
    } else {
      args.emplace(s.arg, user);
    }
  }
  dnnl::memory user_out(plan.out.user_md, eng, out);
  dnnl::memory prim_out = user_out;
  if (plan.out.needs_reorder) prim_out = dnnl::memory(plan.out.prim_md, eng, ws + plan.out.ws_offset);
  args.emplace(plan.out.arg, prim_out);
  args.emplace(DNNL_ARG_SCRATCHPAD, dnnl::memory(plan.scratch_md, eng, ws + plan.scratch_offset));
  plan.prim.execute(strm, args);
  if (plan.out.needs_reorder) plan.out.reorder.execute(strm, prim_out, user_out);
  strm.wait();
}

ffi::Error Run(int kind, ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b,
               ffi::ResultBuffer<ffi::F32> out, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
               int64_t pl, int64_t pr, int64_t groups, int64_t act_any) {
  auto da = a.dimensions(), db = b.dimensions(), dout = out->dimensions();
  if (da.size() != 4 || db.size() != 4 || dout.size() != 4)
    return ffi::Error::InvalidArgument("onednn_conv: all operands must be rank 4");
  if (groups < 1) return ffi::Error::InvalidArgument("onednn_conv: groups must be >= 1");
  const int64_t G = groups;
  int64_t N, H, W, C, O, KH, KW, OH, OW;
  if (kind == kFwd) {  // x, w -> y
    N = da[0]; H = da[1]; W = da[2]; C = da[3];
    KH = db[0]; KW = db[1]; O = db[3];
    OH = dout[1]; OW = dout[2];
    if (db[2] * G != C || dout[0] != N || dout[3] != O)
      return ffi::Error::InvalidArgument("onednn_conv fwd: inconsistent shapes");
  } else if (kind == kBwdData) {  // dy, w -> dx
    N = da[0]; OH = da[1]; OW = da[2]; O = da[3];
    KH = db[0]; KW = db[1]; C = db[2] * G;
    H = dout[1]; W = dout[2];
    if (db[3] != O || dout[0] != N || dout[3] != C)
      return ffi::Error::InvalidArgument("onednn_conv bwd_data: inconsistent shapes");
  } else {  // x, dy -> dw
    N = da[0]; H = da[1]; W = da[2]; C = da[3];
    OH = db[1]; OW = db[2]; O = db[3];
    KH = dout[0]; KW = dout[1];
    if (db[0] != N || dout[2] * G != C || dout[3] != O)
      return ffi::Error::InvalidArgument("onednn_conv bwd_weights: inconsistent shapes");
  }
  if (C % G != 0 || O % G != 0)
    return ffi::Error::InvalidArgument("onednn_conv: channels not divisible by groups");
  if ((H + pt + pb - KH) / sh + 1 != OH || (W + pl + pr - KW) / sw + 1 != OW)
    return ffi::Error::InvalidArgument("onednn_conv: output size does not match padding/stride");
  const Key key{{kind, N, H, W, C, O, KH, KW, OH, OW, sh, sw, pt, pb, pl, pr, act_any, G}};
  try {
    auto plan = GetPlan(key);
    jaxclf_onednn::ExecGuard guard(plan->serial);
    Execute(*plan, a.untyped_data(), b.untyped_data(), out->untyped_data());
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("onednn_conv: oneDNN error: ") + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string("onednn_conv: ") + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error Fwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y,
               int64_t sh, int64_t sw, int64_t pt, int64_t pb, int64_t pl, int64_t pr,
               int64_t groups, int64_t act_any) {
  return Run(kFwd, x, w, y, sh, sw, pt, pb, pl, pr, groups, act_any);
}
ffi::Error BwdData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw, int64_t pt, int64_t pb,
                   int64_t pl, int64_t pr, int64_t groups, int64_t act_any) {
  return Run(kBwdData, dy, w, dx, sh, sw, pt, pb, pl, pr, groups, act_any);
}
ffi::Error BwdWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t pt,
                      int64_t pb, int64_t pl, int64_t pr, int64_t groups, int64_t act_any) {
  return Run(kBwdWeights, x, dy, dw, sh, sw, pt, pb, pl, pr, groups, act_any);
}

}  // namespace

#define JAXCLF_CONV_BINDING                                                    \
  ffi::Ffi::Bind()                                                             \
      .Arg<ffi::Buffer<ffi::F32>>()                                            \
      .Arg<ffi::Buffer<ffi::F32>>()                                            \
      .Ret<ffi::Buffer<ffi::F32>>()                                            \
      .Attr<int64_t>("sh")                                                     \
      .Attr<int64_t>("sw")                                                     \
      .Attr<int64_t>("pt")                                                     \
      .Attr<int64_t>("pb")                                                     \
      .Attr<int64_t>("pl")                                                     \
      .Attr<int64_t>("pr")                                                     \
      .Attr<int64_t>("groups")                                                 \
      .Attr<int64_t>("act_any")

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnConvFwd, Fwd, JAXCLF_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnConvBwdData, BwdData, JAXCLF_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnConvBwdWeights, BwdWeights, JAXCLF_CONV_BINDING);

extern "C" {

// 1: serialise oneDNN calls (default); 0: let XLA's threads run them concurrently.
void jaxclf_onednn_set_serialize(int on) { jaxclf_onednn::Serialize() = on; }
// > 0: each call runs oneDNN with this many OpenMP threads; 0: OpenMP's default.
void jaxclf_onednn_set_num_threads(int n) { jaxclf_onednn::NumThreads() = n; }
int jaxclf_onednn_cache_size() {
  std::lock_guard<std::mutex> lock(g_cache_mu);
  return static_cast<int>(g_cache->size());
}
// The implementation oneDNN chose for a shape (e.g. "jit:avx"), for the benchmark's report.
// v17: N, H, W, C, O, KH, KW, OH, OW, sh, sw, pt, pb, pl, pr, act_any, groups.
// Writes at most n-1 chars + NUL into buf; returns 0 on success.
int jaxclf_onednn_impl(int kind, const int64_t* v17, char* buf, int n) {
  Key k;
  k.v[0] = kind;
  for (int i = 0; i < 17; ++i) k.v[i + 1] = v17[i];
  try {
    auto plan = GetPlan(k);
    std::string s = plan->impl;
    if (plan->in0.needs_reorder || plan->in1.needs_reorder || plan->out.needs_reorder) {
      s += " reorders:";
      if (plan->in0.needs_reorder) s += " in0";
      if (plan->in1.needs_reorder) s += " in1";
      if (plan->out.needs_reorder) s += " out";
    }
    std::snprintf(buf, n, "%s", s.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(buf, n, "error: %s", e.what());
    return 1;
  }
}
}

// oneDNN batch normalisation (training statistics, optionally fused with the ReLU after it) and
// max pooling, forward and backward, as XLA FFI handlers for jaxclf.ops.onednn. float32, NHWC.
// See onednn.py for the Python side and onednn_conv.cc for the convolutions.
//
//   bn_fwd:    x (N,H,W,C), scale (C), shift (C)          -> y, mean (C), var (C), ws (u8 bytes)
//   bn_bwd:    x, dy, scale, mean, var, ws                 -> dx, dscale (C), dshift (C)
//   pool_fwd:  x (N,H,W,C)                                 -> y (N,OH,OW,C), ws (u8 bytes)
//   pool_bwd:  dy (N,OH,OW,C), ws                          -> dx (N,H,W,C)
// BN attributes: eps (float), relu (0/1: y = relu(bn(x)); the workspace then holds the ReLU mask
// the backward needs). Pool attributes: kh, kw, sh, sw, no padding, and the windows must tile the
// input exactly (the Python side crops odd edges first, as VALID pooling drops them); the
// workspace holds the argmax of each window. The workspace sizes come from jaxclf_onednn_*_workspace_bytes, which
// Python calls at trace time to shape the buffer.
//
// `mean` and `var` are the batch mean and the biased variance (what nn.BatchNorm computes and
// feeds its running averages). Primitives are cached per shape; scratchpads are user-managed.

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "dnnl.hpp"
#include "onednn_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using jaxclf_onednn::AlignUp;
using jaxclf_onednn::Engine;

namespace {

using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;
using Key = jaxclf_onednn::Int64Key<8>;
using nf = dnnl::normalization_flags;

// ---------------------------------------------------------------------------- batch norm

struct BnPlan {
  dnnl::batch_normalization_forward fwd;
  dnnl::batch_normalization_backward bwd;
  dnnl::memory::desc data_md, stat_md, ws_md, fwd_scratch_md, bwd_scratch_md;
  bool relu = false;
};

std::shared_ptr<BnPlan> GetBnPlan(int64_t n, int64_t h, int64_t w, int64_t c, float eps,
                                  bool relu) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<Key, std::shared_ptr<BnPlan>,
                                              jaxclf_onednn::Int64KeyHash>();
  int32_t eps_bits;
  std::memcpy(&eps_bits, &eps, sizeof(eps));
  const Key key{{n, h, w, c, eps_bits, relu ? 1 : 0, 0, 0}};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;

  auto& eng = Engine();
  auto plan = std::make_shared<BnPlan>();
  plan->relu = relu;
  plan->data_md = dnnl::memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  plan->stat_md = dnnl::memory::desc({c}, dt::f32, tag::a);
  const nf flags = nf::use_scale | nf::use_shift | (relu ? nf::fuse_norm_relu : nf::none);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::batch_normalization_forward::primitive_desc fpd(
      eng, dnnl::prop_kind::forward_training, plan->data_md, plan->data_md, eps, flags, attr);
  // oneDNN lists its reference-layout jit kernel (bnorm_jit) first for a forward pass on NHWC
  // data; its NHWC-specialised kernel (bnorm_tbb_jit, which it already picks for the backward)
  // measured faster at 256x28x28x32 (best of 30: 7.3 against 20.0 ms, loaded machine). Take
  // that one when it is there.
  for (auto probe = fpd;;) {
    if (std::string(probe.impl_info_str()).find("tbb_jit") != std::string::npos) {
      fpd = probe;
      break;
    }
    if (!probe.next_impl()) break;
  }
  dnnl::batch_normalization_backward::primitive_desc bpd(
      eng, dnnl::prop_kind::backward, plan->data_md, plan->data_md, plan->data_md, eps, flags,
      fpd, attr);
  plan->fwd = dnnl::batch_normalization_forward(fpd);
  plan->bwd = dnnl::batch_normalization_backward(bpd);
  plan->ws_md = fpd.workspace_desc();
  plan->fwd_scratch_md = fpd.scratchpad_desc();
  plan->bwd_scratch_md = bpd.scratchpad_desc();
  cache->emplace(key, plan);
  return plan;
}

ffi::Error CheckNhwc(const ffi::Buffer<ffi::F32>& x, int64_t& n, int64_t& h, int64_t& w,
                     int64_t& c, const char* what) {
  auto d = x.dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument(std::string(what) + ": x must be rank 4");
  n = d[0]; h = d[1]; w = d[2]; c = d[3];
  return ffi::Error::Success();
}

template <typename F>
ffi::Error Guarded(const char* what, F&& body) {
  try {
    body();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string(what) + ": oneDNN error: " + e.what());
  } catch (const std::exception& e) {
    return ffi::Error::Internal(std::string(what) + ": " + e.what());
  }
  return ffi::Error::Success();
}

ffi::Error BnFwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> shift, ffi::ResultBuffer<ffi::F32> y,
                 ffi::ResultBuffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> var,
                 ffi::ResultBuffer<ffi::U8> ws, float eps, int64_t relu) {
  int64_t n, h, w, c;
  if (auto e = CheckNhwc(x, n, h, w, c, "onednn_bn_fwd"); e.failure()) return e;
  if (scale.element_count() != c || shift.element_count() != c || mean->element_count() != c ||
      var->element_count() != c)
    return ffi::Error::InvalidArgument("onednn_bn_fwd: scale/shift/mean/var must have C entries");
  return Guarded("onednn_bn_fwd", [&] {
    auto plan = GetBnPlan(n, h, w, c, eps, relu != 0);
    if (ws->size_bytes() < plan->ws_md.get_size())
      throw std::runtime_error("workspace buffer too small");
    auto& eng = Engine();
    jaxclf_onednn::ExecGuard guard(false);
    char* scratch = jaxclf_onednn::ThreadWorkspace().Get(plan->fwd_scratch_md.get_size());
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, dnnl::memory(plan->data_md, eng, x.untyped_data())},
        {DNNL_ARG_DST, dnnl::memory(plan->data_md, eng, y->untyped_data())},
        {DNNL_ARG_SCALE, dnnl::memory(plan->stat_md, eng, scale.untyped_data())},
        {DNNL_ARG_SHIFT, dnnl::memory(plan->stat_md, eng, shift.untyped_data())},
        {DNNL_ARG_MEAN, dnnl::memory(plan->stat_md, eng, mean->untyped_data())},
        {DNNL_ARG_VARIANCE, dnnl::memory(plan->stat_md, eng, var->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, dnnl::memory(plan->fwd_scratch_md, eng, scratch)}};
    if (plan->relu) args.emplace(DNNL_ARG_WORKSPACE,
                                 dnnl::memory(plan->ws_md, eng, ws->untyped_data()));
    dnnl::stream strm(eng);
    plan->fwd.execute(strm, args);
    strm.wait();
  });
}

ffi::Error BnBwd(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> scale,
                 ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> var, ffi::Buffer<ffi::U8> ws,
                 ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dscale,
                 ffi::ResultBuffer<ffi::F32> dshift, float eps, int64_t relu) {
  int64_t n, h, w, c;
  if (auto e = CheckNhwc(x, n, h, w, c, "onednn_bn_bwd"); e.failure()) return e;
  if (dy.element_count() != x.element_count() || dx->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("onednn_bn_bwd: x, dy and dx must have the same shape");
  return Guarded("onednn_bn_bwd", [&] {
    auto plan = GetBnPlan(n, h, w, c, eps, relu != 0);
    if (ws.size_bytes() < plan->ws_md.get_size())
      throw std::runtime_error("workspace buffer too small");
    auto& eng = Engine();
    jaxclf_onednn::ExecGuard guard(false);
    char* scratch = jaxclf_onednn::ThreadWorkspace().Get(plan->bwd_scratch_md.get_size());
    std::unordered_map<int, dnnl::memory> args{
        {DNNL_ARG_SRC, dnnl::memory(plan->data_md, eng, x.untyped_data())},
        {DNNL_ARG_DIFF_DST, dnnl::memory(plan->data_md, eng, dy.untyped_data())},
        {DNNL_ARG_SCALE, dnnl::memory(plan->stat_md, eng, scale.untyped_data())},
        {DNNL_ARG_MEAN, dnnl::memory(plan->stat_md, eng, mean.untyped_data())},
        {DNNL_ARG_VARIANCE, dnnl::memory(plan->stat_md, eng, var.untyped_data())},
        {DNNL_ARG_DIFF_SRC, dnnl::memory(plan->data_md, eng, dx->untyped_data())},
        {DNNL_ARG_DIFF_SCALE, dnnl::memory(plan->stat_md, eng, dscale->untyped_data())},
        {DNNL_ARG_DIFF_SHIFT, dnnl::memory(plan->stat_md, eng, dshift->untyped_data())},
        {DNNL_ARG_SCRATCHPAD, dnnl::memory(plan->bwd_scratch_md, eng, scratch)}};
    if (plan->relu) args.emplace(DNNL_ARG_WORKSPACE,
                                 dnnl::memory(plan->ws_md, eng, ws.untyped_data()));
    dnnl::stream strm(eng);
    plan->bwd.execute(strm, args);
    strm.wait();
  });
}

// ---------------------------------------------------------------------------- max pool

struct PoolPlan {
  dnnl::pooling_forward fwd;
  dnnl::pooling_backward bwd;
  dnnl::memory::desc src_md, dst_md, ws_md, fwd_scratch_md, bwd_scratch_md;
};

std::shared_ptr<PoolPlan> GetPoolPlan(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh,
                                      int64_t kw, int64_t sh, int64_t sw) {
  static std::mutex mu;
  static auto* cache = new std::unordered_map<Key, std::shared_ptr<PoolPlan>,
                                              jaxclf_onednn::Int64KeyHash>();
  const Key key{{n, h, w, c, kh, kw, sh, sw}};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return it->second;
  // Exact windows only: the Python side crops trailing rows/columns that fit no window (VALID).
  if (h < kh || w < kw || (h - kh) % sh || (w - kw) % sw)
    throw std::runtime_error("the windows must tile the input exactly (crop it first)");
  const int64_t oh = (h - kh) / sh + 1, ow = (w - kw) / sw + 1;
  auto& eng = Engine();
  auto plan = std::make_shared<PoolPlan>();
  plan->src_md = dnnl::memory::desc({n, c, h, w}, dt::f32, tag::nhwc);
  plan->dst_md = dnnl::memory::desc({n, c, oh, ow}, dt::f32, tag::nhwc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const dnnl::memory::dims strides{sh, sw}, kernel{kh, kw}, dil{0, 0}, pad{0, 0};
  dnnl::pooling_forward::primitive_desc fpd(eng, dnnl::prop_kind::forward_training,
                                            dnnl::algorithm::pooling_max, plan->src_md,
                                            plan->dst_md, strides, kernel, dil, pad, pad, attr);
  dnnl::pooling_backward::primitive_desc bpd(eng, dnnl::algorithm::pooling_max, plan->src_md,
                                             plan->dst_md, strides, kernel, dil, pad, pad, fpd,
                                             attr);
  plan->fwd = dnnl::pooling_forward(fpd);
  plan->bwd = dnnl::pooling_backward(bpd);
  plan->ws_md = fpd.workspace_desc();
  plan->fwd_scratch_md = fpd.scratchpad_desc();
  plan->bwd_scratch_md = bpd.scratchpad_desc();
  cache->emplace(key, plan);
  return plan;
}

ffi::Error PoolFwd(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::U8> ws, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw) {
  int64_t n, h, w, c;
  if (auto e = CheckNhwc(x, n, h, w, c, "onednn_pool_fwd"); e.failure()) return e;
  return Guarded("onednn_pool_fwd", [&] {
    auto plan = GetPoolPlan(n, h, w, c, kh, kw, sh, sw);
    if (ws->size_bytes() < plan->ws_md.get_size() ||
        y->element_count() * 4 != static_cast<int64_t>(plan->dst_md.get_size()))
      throw std::runtime_error("output or workspace buffer has the wrong size");
    auto& eng = Engine();
    jaxclf_onednn::ExecGuard guard(false);
    char* scratch = jaxclf_onednn::ThreadWorkspace().Get(plan->fwd_scratch_md.get_size());
    dnnl::stream strm(eng);
    plan->fwd.execute(strm, {{DNNL_ARG_SRC, dnnl::memory(plan->src_md, eng, x.untyped_data())},
                             {DNNL_ARG_DST, dnnl::memory(plan->dst_md, eng, y->untyped_data())},
                             {DNNL_ARG_WORKSPACE,
                              dnnl::memory(plan->ws_md, eng, ws->untyped_data())},
                             {DNNL_ARG_SCRATCHPAD,
                              dnnl::memory(plan->fwd_scratch_md, eng, scratch)}});
    strm.wait();
  });
}

ffi::Error PoolBwd(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::U8> ws,
                   ffi::ResultBuffer<ffi::F32> dx, int64_t kh, int64_t kw, int64_t sh,
                   int64_t sw) {
  auto d = dx->dimensions();
  if (d.size() != 4) return ffi::Error::InvalidArgument("onednn_pool_bwd: dx must be rank 4");
  const int64_t n = d[0], h = d[1], w = d[2], c = d[3];
  return Guarded("onednn_pool_bwd", [&] {
    auto plan = GetPoolPlan(n, h, w, c, kh, kw, sh, sw);
    if (ws.size_bytes() < plan->ws_md.get_size() ||
        dy.element_count() * 4 != static_cast<int64_t>(plan->dst_md.get_size()))
      throw std::runtime_error("dy or workspace buffer has the wrong size");
    auto& eng = Engine();
    jaxclf_onednn::ExecGuard guard(false);
    char* scratch = jaxclf_onednn::ThreadWorkspace().Get(plan->bwd_scratch_md.get_size());
    dnnl::stream strm(eng);
    plan->bwd.execute(strm, {{DNNL_ARG_DIFF_DST, dnnl::memory(plan->dst_md, eng, dy.untyped_data())},
                             {DNNL_ARG_WORKSPACE, dnnl::memory(plan->ws_md, eng, ws.untyped_data())},
                             {DNNL_ARG_DIFF_SRC, dnnl::memory(plan->src_md, eng, dx->untyped_data())},
                             {DNNL_ARG_SCRATCHPAD,
                              dnnl::memory(plan->bwd_scratch_md, eng, scratch)}});
    strm.wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnBnFwd, BnFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnBnBwd, BnBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Attr<int64_t>("relu"));
#define JAXCLF_POOL_ATTRS .Attr<int64_t>("kh").Attr<int64_t>("kw").Attr<int64_t>("sh").Attr<int64_t>("sw")
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnPoolFwd, PoolFwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::U8>>() JAXCLF_POOL_ATTRS);
XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxclfOnednnPoolBwd, PoolBwd,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Ret<ffi::Buffer<ffi::F32>>() JAXCLF_POOL_ATTRS);

extern "C" {

// Workspace bytes the handlers need for a shape (the Python side shapes its u8 buffer with it);
// -1 when oneDNN cannot make the primitive.
int64_t jaxclf_onednn_bn_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c, float eps,
                                         int relu) {
  try {
    return static_cast<int64_t>(GetBnPlan(n, h, w, c, eps, relu != 0)->ws_md.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}

int64_t jaxclf_onednn_pool_workspace_bytes(int64_t n, int64_t h, int64_t w, int64_t c, int64_t kh,
                                           int64_t kw, int64_t sh, int64_t sw) {
  try {
    return static_cast<int64_t>(GetPoolPlan(n, h, w, c, kh, kw, sh, sw)->ws_md.get_size());
  } catch (const std::exception&) {
    return -1;
  }
}
}

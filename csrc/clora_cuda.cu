// CUDA fallback backend of clora_kernels (DESIGN.md section 5).
//
//   clora::cuda_linear_fwd(x, weight, bias?, lora_a, lora_b, routing_old, routing_delta, projection?, s) -> (y, t)
//       t = x·lora_aᵀ and u = t·R_eff in one pass over x (the shrink kernel below), then
//       y = x·weightᵀ + bias (cuBLAS through ATen) and y += s·u·lora_bᵀ (cuBLAS, beta = 1).
//   clora::cuda_linear_dx(g, weight, lora_a, lora_b, routing_old, routing_delta, projection?, s) -> (dx, v)
//       v = g·lora_b and u = v·R_effᵀ in one pass over g (same kernel), dx = g·weight + s·u·lora_a.
//
// Shrink kernel: one warp per row; lanes stride over K with 16-byte vector loads of the row and of
// each rank's row of Aᵀ (r×K, contiguous), fp32 accumulation, warp-shuffle reduction. R_eff =
// R_old + P·R_delta (or its transpose) is built once per block in shared memory. Ranks up to 128
// (accumulators per lane: MAX_R, a template parameter 16/32/64/128).
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

constexpr int kWarps = 4;

template <typename T, int MAX_R, int VEC>
__global__ void shrink_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ at,
                              const T* __restrict__ r_old, const T* __restrict__ r_delta,
                              const T* __restrict__ proj, bool trans_r, int64_t M, int64_t K, int R,
                              T* __restrict__ t_out, float* __restrict__ u_out) {
  extern __shared__ float smem[];
  float* reff = smem;                                  // R x R
  float* trow = smem + R * R;                          // kWarps x MAX_R
  for (int idx = threadIdx.x; idx < R * R; idx += blockDim.x) {
    int i = idx / R, j = idx % R;                      // element (i, j) of R_eff (transposed if trans_r)
    int a = trans_r ? j : i, b = trans_r ? i : j;
    float v = to_f(r_old[a * R + b]);
    if (proj != nullptr) {
      for (int k = 0; k < R; ++k) v += to_f(proj[a * R + k]) * to_f(r_delta[k * R + b]);
    } else {
      v += to_f(r_delta[a * R + b]);
    }
    reff[idx] = v;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* tw = trow + warp * MAX_R;
  for (int64_t row = (int64_t)blockIdx.x * kWarps + warp; row < M; row += (int64_t)gridDim.x * kWarps) {
    float acc[MAX_R];
#pragma unroll
    for (int j = 0; j < MAX_R; ++j) acc[j] = 0.f;
    const T* xr = x + row * ldx;
    for (int64_t k0 = (int64_t)lane * VEC; k0 < K; k0 += 32 * VEC) {
      alignas(16) T xv[VEC];
      if (VEC > 1 && k0 + VEC <= K) {
        *reinterpret_cast<uint4*>(xv) = *reinterpret_cast<const uint4*>(xr + k0);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) xv[e] = (k0 + e < K) ? xr[k0 + e] : from_f<T>(0.f);
      }
#pragma unroll
      for (int j = 0; j < MAX_R; ++j) {
        if (j < R) {
          const T* ar = at + (int64_t)j * K + k0;
          alignas(16) T av[VEC];
          if (VEC > 1 && k0 + VEC <= K) {
            *reinterpret_cast<uint4*>(av) = *reinterpret_cast<const uint4*>(ar);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) av[e] = (k0 + e < K) ? ar[e] : from_f<T>(0.f);
          }
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[j] += to_f(xv[e]) * to_f(av[e]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < MAX_R; ++j) {
      float v = acc[j];
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0 && j < R) tw[j] = v;
    }
    __syncwarp();
    for (int j = lane; j < R; j += 32) {
      T tq = from_f<T>(tw[j]);
      t_out[row * R + j] = tq;
      tw[j] = to_f(tq);                                 // u from the rounded t, as the reference does
    }
    __syncwarp();
    for (int j = lane; j < R; j += 32) {
      float v = 0.f;
      for (int i = 0; i < R; ++i) v += tw[i] * reff[i * R + j];
      u_out[row * R + j] = v;
    }
    __syncwarp();
  }
}

template <typename T, int MAX_R>
void launch_shrink(const at::Tensor& x, const at::Tensor& at_, const at::Tensor& r_old, const at::Tensor& r_delta,
                   const c10::optional<at::Tensor>& proj, bool trans_r, at::Tensor& t, at::Tensor& u) {
  const int64_t M = x.size(0), K = x.size(1);
  const int R = static_cast<int>(at_.size(0));
  constexpr int vec = 16 / sizeof(T);
  const bool aligned = (K % vec == 0) && (x.stride(0) % vec == 0) &&
                       (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) &&
                       (reinterpret_cast<uintptr_t>(at_.data_ptr()) % 16 == 0);
  const int64_t blocks_needed = (M + kWarps - 1) / kWarps;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, 65535));
  const size_t shmem = sizeof(float) * (R * R + kWarps * MAX_R);
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* p = proj.has_value() ? reinterpret_cast<const T*>(proj->data_ptr()) : nullptr;
  auto args = [&](auto kernel) {
    if (shmem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem));
    }
    kernel<<<blocks, kWarps * 32, shmem, stream>>>(
        reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), reinterpret_cast<const T*>(at_.data_ptr()),
        reinterpret_cast<const T*>(r_old.data_ptr()), reinterpret_cast<const T*>(r_delta.data_ptr()), p, trans_r,
        M, K, R, reinterpret_cast<T*>(t.data_ptr()), u.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (aligned) {
    args(shrink_kernel<T, MAX_R, vec>);
  } else {
    args(shrink_kernel<T, MAX_R, 1>);
  }
}

template <typename T>
void shrink_dispatch_rank(const at::Tensor& x, const at::Tensor& at_, const at::Tensor& r_old,
                          const at::Tensor& r_delta, const c10::optional<at::Tensor>& proj, bool trans_r,
                          at::Tensor& t, at::Tensor& u) {
  const int64_t R = at_.size(0);
  if (R <= 16) launch_shrink<T, 16>(x, at_, r_old, r_delta, proj, trans_r, t, u);
  else if (R <= 32) launch_shrink<T, 32>(x, at_, r_old, r_delta, proj, trans_r, t, u);
  else if (R <= 64) launch_shrink<T, 64>(x, at_, r_old, r_delta, proj, trans_r, t, u);
  else launch_shrink<T, 128>(x, at_, r_old, r_delta, proj, trans_r, t, u);
}

// t = x·at_ᵀ (x's dtype), u = t·R (fp32); at_ is (r, K) contiguous.
std::tuple<at::Tensor, at::Tensor> shrink(const char* op, const at::Tensor& x_in, const at::Tensor& at_in,
                                          const at::Tensor& r_old_in, const at::Tensor& r_delta_in,
                                          const c10::optional<at::Tensor>& proj_in, bool trans_r) {
  TORCH_CHECK(x_in.is_cuda(), op, ": tensors must be on a CUDA device, got ", x_in.device());
  TORCH_CHECK(x_in.dim() == 2 && at_in.dim() == 2 && x_in.size(1) == at_in.size(1), op,
              ": expected x (M, K) and A (r, K), got ", x_in.sizes(), " and ", at_in.sizes());
  const int64_t R = at_in.size(0);
  TORCH_CHECK(R >= 1 && R <= 128, op, ": rank must be in [1, 128], got ", R);
  auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat, op,
              ": dtype must be float16, bfloat16 or float32, got ", dtype);
  c10::cuda::CUDAGuard guard(x_in.device());
  auto x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  auto at_ = at_in.contiguous();
  auto r_old = r_old_in.contiguous(), r_delta = r_delta_in.contiguous();
  c10::optional<at::Tensor> proj;
  if (proj_in.has_value()) proj = proj_in->contiguous();
  auto t = at::empty({x.size(0), R}, x.options());
  auto u = at::empty({x.size(0), R}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return {t, u};
  if (dtype == at::kHalf) shrink_dispatch_rank<__half>(x, at_, r_old, r_delta, proj, trans_r, t, u);
  else if (dtype == at::kBFloat16) shrink_dispatch_rank<__nv_bfloat16>(x, at_, r_old, r_delta, proj, trans_r, t, u);
  else shrink_dispatch_rank<float>(x, at_, r_old, r_delta, proj, trans_r, t, u);
  return {t, u};
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, const at::Tensor& routing_old,
                                                   const at::Tensor& routing_delta,
                                                   const c10::optional<at::Tensor>& projection, double scaling) {
  auto [t, u] = shrink("clora::cuda_linear_fwd", x, lora_a, routing_old, routing_delta, projection, false);
  auto y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  y.addmm_(u.to(x.scalar_type()), lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
  return {y, t};
}

std::tuple<at::Tensor, at::Tensor> linear_dx_cuda(const at::Tensor& g, const at::Tensor& weight,
                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                  const at::Tensor& routing_old, const at::Tensor& routing_delta,
                                                  const c10::optional<at::Tensor>& projection, double scaling) {
  // v = g·lora_b and u = v·R_effᵀ in one pass over g; then dx = g·W + s·u·lora_a
  auto [v, u] = shrink("clora::cuda_linear_dx", g, lora_b.t(), routing_old, routing_delta, projection, true);
  auto dx = at::mm(g, weight);
  dx.addmm_(u.to(g.scalar_type()), lora_a, /*beta=*/1, /*alpha=*/scaling);
  return {dx, v};
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_meta(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, const at::Tensor& routing_old,
                                                   const at::Tensor& routing_delta,
                                                   const c10::optional<at::Tensor>& projection, double scaling) {
  return {at::empty({x.size(0), weight.size(0)}, x.options()), at::empty({x.size(0), lora_a.size(0)}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> linear_dx_meta(const at::Tensor& g, const at::Tensor& weight,
                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                  const at::Tensor& routing_old, const at::Tensor& routing_delta,
                                                  const c10::optional<at::Tensor>& projection, double scaling) {
  return {at::empty({g.size(0), weight.size(1)}, g.options()), at::empty({g.size(0), lora_a.size(0)}, g.options())};
}

}  // namespace

// FRAGMENT: the Python side registers clora::linear_fwd / linear_dx in the same namespace.
TORCH_LIBRARY_FRAGMENT(clora, m) {
  m.def("cuda_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor routing_old, "
        "Tensor routing_delta, Tensor? projection, float scaling) -> (Tensor, Tensor)");
  m.def("cuda_linear_dx(Tensor g, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor routing_old, "
        "Tensor routing_delta, Tensor? projection, float scaling) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clora, CUDA, m) {
  m.impl("cuda_linear_fwd", &linear_fwd_cuda);
  m.impl("cuda_linear_dx", &linear_dx_cuda);
}

TORCH_LIBRARY_IMPL(clora, Meta, m) {
  m.impl("cuda_linear_fwd", &linear_fwd_meta);
  m.impl("cuda_linear_dx", &linear_dx_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}   // importable as clora_kernels._C when built by setup.py

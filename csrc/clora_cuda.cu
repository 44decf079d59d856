// CUDA fallback backend of clora_kernels (DESIGN.md section 5).
//
//   clora::cuda_linear_fwd(x, weight, bias?, lora_a, lora_b, routing_old, routing_delta, projection?, s,
//                          fused_max_mr) -> (y, t)
//       t = x·lora_aᵀ and u = t·R_eff (the shrink below), then y = x·weightᵀ + bias (cuBLAS through
//       ATen) and y += s·u·lora_bᵀ (cuBLAS, beta = 1).
//   clora::cuda_linear_dx(g, weight, lora_a, lora_b, routing_old, routing_delta, projection?, s,
//                         fused_max_mr) -> (dx, v)
//       v = g·lora_b and u = v·R_effᵀ (same shrink), then dx = g·weight + s·u·lora_a.
//
// The shrink has two forms, chosen per call by M·r (fused when M·r <= fused_max_mr):
//   fused   (small M, e.g. decoding): shrink_partial_kernel reads x once with 16-byte vector loads,
//           split over K across blocks so that even M = 1 spreads the read of A over many SMs, and
//           writes fp32 partial sums; shrink_finish_kernel adds them in a fixed order (deterministic,
//           no atomics), rounds t to x's dtype, and multiplies by R_eff built in shared memory.
//   cuBLAS  (large M): t = x·Aᵀ by cuBLAS, which reuses A across rows; shrink_finish_kernel then
//           computes u = t·R_eff. (The fused form re-reads A for every row.)
// R_eff = R_old + P·R_delta (or its transpose, for dx) is built in shared memory from R_old and
// R_new = P·R_delta; in hard mode R_new is one r×r cuBLAS product, in soft mode it is R_delta.
// fp32 accumulation throughout; u is rounded to x's dtype as the torch reference rounds t·R_eff.
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
constexpr int kThreads = kWarps * 32;

// VEC consecutive elements of row[k0 ..] (zeros past K): one 16-byte load when ALIGNED.
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void load_vec(const T* __restrict__ row, int64_t k0, int64_t K, T (&out)[VEC]) {
  if constexpr (ALIGNED) {
    *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(row + k0);
  } else {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = (k0 + e < K) ? row[k0 + e] : from_f<T>(0.f);
  }
}

// Block (row, split): part[split][row][j] = Σ_{k in split's chunk} x[row][k]·at[j][k], j < R.
// Each thread takes VEC consecutive k (one 16-byte load of x and of each rank's row of at when
// ALIGNED); the chunk of a split is kThreads·VEC wide. at is (R, K) contiguous.
template <typename T, int MAX_R, int VEC, bool ALIGNED>
__global__ void shrink_partial_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ at,
                                      int64_t M, int64_t K, int R, float* __restrict__ part) {
  __shared__ float red[kWarps][MAX_R];
  const int64_t row = blockIdx.x;
  const int split = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t k0 = (int64_t)split * kThreads * VEC + (int64_t)threadIdx.x * VEC;
  float acc[MAX_R];
#pragma unroll
  for (int j = 0; j < MAX_R; ++j) acc[j] = 0.f;
  if (k0 < K) {
    alignas(16) T xv[VEC];
    load_vec<T, VEC, ALIGNED>(x + row * ldx, k0, K, xv);
#pragma unroll
    for (int j = 0; j < MAX_R; ++j) {
      if (j < R) {
        alignas(16) T av[VEC];
        load_vec<T, VEC, ALIGNED>(at + (int64_t)j * K, k0, K, av);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[j] += to_f(xv[e]) * to_f(av[e]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < MAX_R; ++j) {
    float v = acc[j];
    for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
    if (lane == 0 && j < R) red[warp][j] = v;
  }
  __syncthreads();
  for (int j = threadIdx.x; j < R; j += kThreads) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += red[w][j];        // fixed order: deterministic
    part[((int64_t)split * M + row) * R + j] = v;
  }
}

// One warp per row: t[row] = Σ_s part[s][row] rounded to T (or t_in[row] when t came from cuBLAS),
// then u[row] = t[row]·R (R = R_old + R_new, or its transpose) with R in shared memory.
template <typename T>
__global__ void shrink_finish_kernel(const float* __restrict__ part, int splits, const T* __restrict__ t_in,
                                     const T* __restrict__ r_old, const T* __restrict__ r_new, bool trans_r,
                                     int64_t M, int R, T* __restrict__ t_out, T* __restrict__ u_out) {
  extern __shared__ float smem[];
  float* reff = smem;                                  // R x R
  for (int idx = threadIdx.x; idx < R * R; idx += blockDim.x) {
    const int i = idx / R, j = idx % R;
    const int src = trans_r ? j * R + i : idx;
    reff[idx] = to_f(r_old[src]) + to_f(r_new[src]);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* tw = smem + R * R + warp * R;                 // this warp's t row
  for (int64_t row = (int64_t)blockIdx.x * kWarps + warp; row < M; row += (int64_t)gridDim.x * kWarps) {
    for (int j = lane; j < R; j += 32) {
      float v;
      if (t_in != nullptr) {
        v = to_f(t_in[row * R + j]);
      } else {
        v = 0.f;
        for (int s = 0; s < splits; ++s) v += part[((int64_t)s * M + row) * R + j];
        const T q = from_f<T>(v);
        t_out[row * R + j] = q;
        v = to_f(q);                                   // u from the rounded t, as the reference does
      }
      tw[j] = v;
    }
    __syncwarp();
    for (int j = lane; j < R; j += 32) {
      float v = 0.f;
      for (int i = 0; i < R; ++i) v += tw[i] * reff[i * R + j];
      u_out[row * R + j] = from_f<T>(v);
    }
    __syncwarp();
  }
}

int sm_count() {
  return at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
}

template <typename T, int MAX_R>
void launch_partial(const at::Tensor& x, const at::Tensor& at_, at::Tensor& part, int splits, bool aligned) {
  const int64_t M = x.size(0), K = x.size(1);
  const int R = static_cast<int>(at_.size(0));
  constexpr int vec = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>(M), static_cast<unsigned>(splits));
  auto stream = at::cuda::getCurrentCUDAStream();
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  const T* ap = reinterpret_cast<const T*>(at_.data_ptr());
  if (aligned) {
    shrink_partial_kernel<T, MAX_R, vec, true><<<grid, kThreads, 0, stream>>>(xp, x.stride(0), ap, M, K, R,
                                                                               part.data_ptr<float>());
  } else {
    shrink_partial_kernel<T, MAX_R, 1, false><<<grid, kThreads, 0, stream>>>(xp, x.stride(0), ap, M, K, R,
                                                                              part.data_ptr<float>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void shrink_typed(const at::Tensor& x, const at::Tensor& at_, bool fused, const at::Tensor& r_old,
                  const at::Tensor& r_new, bool trans_r, at::Tensor& t, at::Tensor& u) {
  // x and at_ are defined only when fused (otherwise t already holds x·at_ᵀ)
  const int64_t M = u.size(0);
  const int R = static_cast<int>(u.size(1));
  at::Tensor part;
  int splits = 0;
  if (fused) {
    const int64_t K = x.size(1);
    constexpr int vec = 16 / sizeof(T);
    const bool aligned = (K % vec == 0) && (x.stride(0) % vec == 0) &&
                         (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0) &&
                         (reinterpret_cast<uintptr_t>(at_.data_ptr()) % 16 == 0);
    const int64_t chunk = static_cast<int64_t>(kThreads) * (aligned ? vec : 1);
    const int64_t s = std::max<int64_t>(1, (K + chunk - 1) / chunk);
    TORCH_CHECK(s <= 65535, "clora cuda shrink: K = ", K, " needs ", s, " splits (at most 65535)");
    splits = static_cast<int>(s);
    part = at::empty({splits, M, R}, x.options().dtype(at::kFloat));
    if (R <= 16) launch_partial<T, 16>(x, at_, part, splits, aligned);
    else if (R <= 32) launch_partial<T, 32>(x, at_, part, splits, aligned);
    else if (R <= 64) launch_partial<T, 64>(x, at_, part, splits, aligned);
    else launch_partial<T, 128>(x, at_, part, splits, aligned);
  }
  const int64_t blocks_needed = (M + kWarps - 1) / kWarps;
  const int blocks = static_cast<int>(std::min<int64_t>(blocks_needed, static_cast<int64_t>(sm_count()) * 8));
  const size_t shmem = sizeof(float) * (static_cast<size_t>(R) * R + kWarps * R);
  auto kernel = shrink_finish_kernel<T>;
  if (shmem > 48 * 1024) {
    // the opt-in is a per-device setting of the kernel, not of this launch: always the most any rank needs
    // (capped by the device), so that two host threads at different ranks never lower it under each other
    const int optin = static_cast<int>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
    TORCH_CHECK(shmem <= static_cast<size_t>(optin), "clora cuda shrink: rank ", R, " needs ", shmem,
                " bytes of shared memory, this device allows ", optin);
    const int most = static_cast<int>(sizeof(float) * (128 * 128 + kWarps * 128));
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, std::min(most, optin)));
  }
  kernel<<<blocks, kThreads, shmem, at::cuda::getCurrentCUDAStream()>>>(
      fused ? part.data_ptr<float>() : nullptr, splits,
      fused ? nullptr : reinterpret_cast<const T*>(t.data_ptr()),
      reinterpret_cast<const T*>(r_old.data_ptr()), reinterpret_cast<const T*>(r_new.data_ptr()), trans_r, M, R,
      reinterpret_cast<T*>(t.data_ptr()), reinterpret_cast<T*>(u.data_ptr()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// What this file relies on, checked for callers of the ops themselves (clora_linear has already
// checked it all in Python): x (M, K), or g (M, N) for dx, weight (N, K), bias (N), lora_a (r, K),
// lora_b (N, r), routing_old, routing_delta and projection (r, r), r in [1, 128]; every operand in x's
// dtype (float16, bfloat16 or float32) and on x's device, a CUDA device. (The ops add their name to
// any error raised here: see named_op.)
void check_operands(const at::Tensor& x, bool dx, const at::Tensor& weight,
                    const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a, const at::Tensor& lora_b,
                    const at::Tensor& r_old, const at::Tensor& r_delta, const c10::optional<at::Tensor>& proj) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D (N, K), got ", weight.sizes());
  const int64_t N = weight.size(0), K = weight.size(1), R = lora_a.dim() == 2 ? lora_a.size(0) : -1;
  const int64_t features = dx ? N : K;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == features, dx ? "g" : "x", " must be (M, ", features, "), got ",
              x.sizes());
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == K, "lora_a must be (r, K = ", K, "), got ", lora_a.sizes());
  TORCH_CHECK(R >= 1 && R <= 128, "rank must be in [1, 128], got ", R);
  struct Operand {
    const char* name;
    const at::Tensor* t;
    std::vector<int64_t> want;
  };
  const Operand operands[] = {
      {"weight", &weight, {N, K}}, {"bias", bias ? &*bias : nullptr, {N}}, {"lora_a", &lora_a, {R, K}},
      {"lora_b", &lora_b, {N, R}}, {"routing_old", &r_old, {R, R}}, {"routing_delta", &r_delta, {R, R}},
      {"projection", proj ? &*proj : nullptr, {R, R}}};
  for (const auto& [name, t, want] : operands) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->sizes() == at::IntArrayRef(want), name, " must be ", at::IntArrayRef(want), ", got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "dtype mismatch: ", dx ? "g" : "x", " is ", x.scalar_type(),
                " but ", name, " is ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), "device mismatch: ", dx ? "g" : "x", " is on ", x.device(), " but ", name,
                " is on ", t->device());
  }
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kHalf || dtype == at::kBFloat16 || dtype == at::kFloat,
              "dtype must be float16, bfloat16 or float32, got ", dtype);
  TORCH_CHECK(x.is_cuda(), "tensors must be on a CUDA device, got ", x.device());
}

// t = x·at_ᵀ and u = t·R (both in x's dtype), R = R_old + P·R_delta (transposed if trans_r).
// at_ is (r, K), any strides; the operands passed check_operands.
std::tuple<at::Tensor, at::Tensor> shrink(const at::Tensor& x_in, const at::Tensor& at_in,
                                          const at::Tensor& r_old_in, const at::Tensor& r_delta_in,
                                          const c10::optional<at::Tensor>& proj_in, bool trans_r,
                                          int64_t fused_max_mr) {
  const int64_t M = x_in.size(0), R = at_in.size(0);
  const auto dtype = x_in.scalar_type();
  c10::cuda::CUDAGuard guard(x_in.device());
  // fused only where its K splits fit the grid's y dimension (65535 splits of kThreads elements at least)
  const bool fused = M * R <= fused_max_mr && x_in.size(1) <= static_cast<int64_t>(kThreads) * 65535;
  auto u = at::empty({M, R}, x_in.options());
  at::Tensor t, x, at_;
  if (fused) {
    x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
    at_ = at_in.contiguous();
    t = at::empty({M, R}, x_in.options());
  } else {
    t = at::mm(x_in, at_in.t());                       // cuBLAS: A is reused across rows
  }
  if (M == 0) return {t, u};
  auto r_old = r_old_in.contiguous();
  auto r_new = proj_in.has_value() ? at::mm(*proj_in, r_delta_in) : r_delta_in.contiguous();
  if (dtype == at::kHalf) shrink_typed<__half>(x, at_, fused, r_old, r_new, trans_r, t, u);
  else if (dtype == at::kBFloat16) shrink_typed<__nv_bfloat16>(x, at_, fused, r_old, r_new, trans_r, t, u);
  else shrink_typed<float>(x, at_, fused, r_old, r_new, trans_r, t, u);
  return {t, u};
}

// Runs an op's body: any c10::Error from it (a check, an ATen/cuBLAS call, a CUDA call or kernel
// launch) is rethrown with its type kept (an out-of-memory error stays one) and the op's name
// added, e.g. "CUDA error: ... (in clora::cuda_linear_dx)".
template <typename Body>
auto named_op(const char* op, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (c10::Error& e) {
    TORCH_RETHROW(e, "in ", op);
  }
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, const at::Tensor& routing_old,
                                                   const at::Tensor& routing_delta,
                                                   const c10::optional<at::Tensor>& projection, double scaling,
                                                   int64_t fused_max_mr) {
  return named_op("clora::cuda_linear_fwd", [&]() -> std::tuple<at::Tensor, at::Tensor> {
    check_operands(x, false, weight, bias, lora_a, lora_b, routing_old, routing_delta, projection);
    auto [t, u] = shrink(x, lora_a, routing_old, routing_delta, projection, false, fused_max_mr);
    auto y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    y.addmm_(u, lora_b.t(), /*beta=*/1, /*alpha=*/scaling);
    return {y, t};
  });
}

std::tuple<at::Tensor, at::Tensor> linear_dx_cuda(const at::Tensor& g, const at::Tensor& weight,
                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                  const at::Tensor& routing_old, const at::Tensor& routing_delta,
                                                  const c10::optional<at::Tensor>& projection, double scaling,
                                                  int64_t fused_max_mr) {
  // v = g·lora_b and u = v·R_effᵀ; then dx = g·W + s·u·lora_a
  return named_op("clora::cuda_linear_dx", [&]() -> std::tuple<at::Tensor, at::Tensor> {
    check_operands(g, true, weight, c10::nullopt, lora_a, lora_b, routing_old, routing_delta, projection);
    auto [v, u] = shrink(g, lora_b.t(), routing_old, routing_delta, projection, true, fused_max_mr);
    auto dx = at::mm(g, weight);
    dx.addmm_(u, lora_a, /*beta=*/1, /*alpha=*/scaling);
    return {dx, v};
  });
}

std::tuple<at::Tensor, at::Tensor> linear_fwd_meta(const at::Tensor& x, const at::Tensor& weight,
                                                   const c10::optional<at::Tensor>& bias, const at::Tensor& lora_a,
                                                   const at::Tensor& lora_b, const at::Tensor& routing_old,
                                                   const at::Tensor& routing_delta,
                                                   const c10::optional<at::Tensor>& projection, double scaling,
                                                   int64_t fused_max_mr) {
  return {at::empty({x.size(0), weight.size(0)}, x.options()), at::empty({x.size(0), lora_a.size(0)}, x.options())};
}

std::tuple<at::Tensor, at::Tensor> linear_dx_meta(const at::Tensor& g, const at::Tensor& weight,
                                                  const at::Tensor& lora_a, const at::Tensor& lora_b,
                                                  const at::Tensor& routing_old, const at::Tensor& routing_delta,
                                                  const c10::optional<at::Tensor>& projection, double scaling,
                                                  int64_t fused_max_mr) {
  return {at::empty({g.size(0), weight.size(1)}, g.options()), at::empty({g.size(0), lora_a.size(0)}, g.options())};
}

// "" where this binary holds code that GPU `device` runs, else CUDA's reason (a build for other
// architectures: every launch would fail with "no kernel image is available"). The backend asks it
// once, before it calls itself usable.
std::string runs_here(int64_t device) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, shrink_finish_kernel<float>);
  if (err == cudaSuccess) return "";
  (void)cudaGetLastError();
  return cudaGetErrorString(err);
}

}  // namespace

// FRAGMENT: the Python side registers clora::linear_fwd / linear_dx in the same namespace.
TORCH_LIBRARY_FRAGMENT(clora, m) {
  m.def("cuda_runs_here(int device) -> str", &runs_here);
  m.def("cuda_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor lora_a, Tensor lora_b, Tensor routing_old, "
        "Tensor routing_delta, Tensor? projection, float scaling, int fused_max_mr) -> (Tensor, Tensor)");
  m.def("cuda_linear_dx(Tensor g, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor routing_old, "
        "Tensor routing_delta, Tensor? projection, float scaling, int fused_max_mr) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(clora, CUDA, m) {
  m.impl("cuda_linear_fwd", &linear_fwd_cuda);
  m.impl("cuda_linear_dx", &linear_dx_cuda);
}

// CPU tensors reach the same entry points, which check shapes, rank and dtype and then refuse the
// device, each message ending "(in clora::cuda_linear_...)" (the dispatcher's own error would name no
// argument); this also lets the CPU-only CI run the validation and the error naming of this file.
TORCH_LIBRARY_IMPL(clora, CPU, m) {
  m.impl("cuda_linear_fwd", &linear_fwd_cuda);
  m.impl("cuda_linear_dx", &linear_dx_cuda);
}

TORCH_LIBRARY_IMPL(clora, Meta, m) {
  m.impl("cuda_linear_fwd", &linear_fwd_meta);
  m.impl("cuda_linear_dx", &linear_dx_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}   // importable as clora_kernels._C when built by setup.py

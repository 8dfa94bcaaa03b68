"""bench/profile_step.py: the kernel kinds it sorts GPU kernels into (names as an H100 run printed them, so
a CPU test covers the GPU table), and its bad-input lines."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from profile_step import kind_of  # noqa: E402


@pytest.mark.parametrize("name,kind", [
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_35_16x128x128_1x4x1_cga1x1x1_kernel0_0",
     "attention"),
    ("nvjet_sm90_hsh_168x64_64x7_2x1_v_bz_TNN", "matmul"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float, __half, false, float>", "matmul"),
    ("triton_poi_fused__unsafe_view_add_cat_mul_neg_slice_split_with_sizes_transpose_view_1",
     "triton (fused by inductor)"),
    ("triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_0", "triton (fused by inductor)"),
    ("void at::native::index_elementwise_kernel<128, 4, at::native::index_copy_kernel_impl<at::native::OpaqueType<2>",
     "copy / index"),
    ("Memcpy DtoD (Device -> Device)", "copy / index"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::ArgMaxOps<float>", "sampling / reductions"),
    ("aten::linear", "matmul"),                      # CPU: top-level aten ops stand in for kernels
    ("aten::scaled_dot_product_attention", "attention"),
    ("aten::rsqrt", "other"),
])
def test_kernels_are_sorted_by_kind(name, kind):
    assert kind_of(name) == kind


@pytest.mark.parametrize("args,message", [
    (["--variants", "flash"], "bad variant 'flash'"),
    (["--variants", "sdpa:48"], "bad variant 'sdpa:48'"),
    (["--batches", "1,x"], "--batches must be comma-separated integers"),
    (["--steps", "0"], "must be positive"),
    (["--model", "tiny", "--steps", "3000"], "must stay below the model's context of 2048 tokens"),
])
def test_bad_arguments_exit_with_one_line(args, message):
    done = subprocess.run([sys.executable, str(REPO / "bench" / "profile_step.py"), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr

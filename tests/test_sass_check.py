"""tools/sass_check.py's parsing and rule on recorded cuobjdump -sass output
(sm_90, nvcc 13.0): a hot kernel's 16-byte vector instantiation must issue
LDG.E.128 (and STG.E.128 where it writes a tensor); scalar (kVec == 1) and
per-channel kernels are listed, not checked. No GPU, nvcc or cuobjdump needed."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("sass_check", ROOT / "tools" / "sass_check.py")
sass_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sass_check)

NORMALIZE_F4 = ("_ZN8fused_bn4cuda6detail30channels_last_normalize_kernelIfLi4ENS_6common8EpilogueINS3_11Hardsigmoid"
                "ELb0EEEEEvPKT_S9_PS7_NS3_8GeometryElNS1_13NormalizeArgsINS0_14AccumulateTypeIS7_E4typeENT1_10Activa"
                "tionEEE")
NORMALIZE_F1 = NORMALIZE_F4.replace("IfLi4E", "IfLi1E")
FINALIZE = "_ZN8fused_bn4cuda6detail23finalize_moments_kernelIdfEEvNS1_19FinalizeMomentsArgsIT_T0_EE"

HEADER = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]
host = linux
compile_size = 64bit

	code for sm_90
"""


def function(name, lines):
    body = "\n".join(f"        /*{i * 16:04x}*/                   {line} ;    /* 0x0000000806067981 */"
                     for i, line in enumerate(lines))
    return f"\t\tFunction : {name}\n\t.headerflags\t@\"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)\"\n{body}\n"


VECTOR_LINES = [
    "LDG.E.CONSTANT R31, desc[UR8][R6.64]",            # per-channel coefficient (scalar)
    "@!P0 LDG.E.128.CONSTANT R4, desc[UR8][R2.64]",    # the bundle
    "LDG.E.U16 R6, desc[UR8][R6.64]",
    "FFMA R4, R4, R31, R30",
    "@P1 STG.E.128 desc[UR8][R8.64], R4",
    "STG.E.64 desc[UR8][R4.64], R2",
    "EXIT",
]
# The same kernel with load_bundle/store_bundle made element by element.
SCALAR_LINES = [line.replace(".128", "") for line in VECTOR_LINES]


def run_check(sass):
    kernels = sass_check.parse_sass(sass)
    names = {NORMALIZE_F4: "void fused_bn::cuda::detail::channels_last_normalize_kernel<float, 4, "
                           "fused_bn::common::Epilogue<fused_bn::common::Hardsigmoid, false> >(float const*)",
             NORMALIZE_F1: "void fused_bn::cuda::detail::channels_last_normalize_kernel<float, 1, "
                           "fused_bn::common::Epilogue<fused_bn::common::Hardsigmoid, false> >(float const*)",
             FINALIZE: "void fused_bn::cuda::detail::finalize_moments_kernel<double, float>(args)"}
    return kernels, sass_check.check(kernels, names)


def test_parse_counts_widths():
    kernels = sass_check.parse_sass(HEADER + function(NORMALIZE_F4, VECTOR_LINES))
    counts = kernels[NORMALIZE_F4]
    assert counts[("LDG", "128")] == 1 and counts[("LDG", "32")] == 1 and counts[("LDG", "16")] == 1
    assert counts[("STG", "128")] == 1 and counts[("STG", "64")] == 1
    assert sum(counts.values()) == 5  # FFMA and EXIT are not memory accesses


def test_vector_path_with_128_bit_accesses_passes():
    _, (rows, failures) = run_check(HEADER + function(NORMALIZE_F4, VECTOR_LINES) + function(FINALIZE, SCALAR_LINES))
    assert failures == []
    assert [r[1] is not None for r in rows] == [True, False]  # finalize is listed, not checked


def test_scalar_vector_path_fails():
    _, (_, failures) = run_check(HEADER + function(NORMALIZE_F4, SCALAR_LINES))
    assert len(failures) == 1
    assert "no LDG.E.128" in failures[0] and "no STG.E.128" in failures[0]
    assert "channels_last_normalize_kernel<float, 4" in failures[0]


def test_store_only_fault_is_named():
    lines = [line.replace("STG.E.128", "STG.E") for line in VECTOR_LINES]
    _, (_, failures) = run_check(HEADER + function(NORMALIZE_F4, lines))
    assert len(failures) == 1 and "no STG.E.128" in failures[0] and "no LDG.E.128" not in failures[0]


def test_scalar_instantiation_is_not_checked():
    _, (_, failures) = run_check(HEADER + function(NORMALIZE_F1, SCALAR_LINES))
    assert failures == []


def test_expectations_follow_the_code():
    e = sass_check.expectation
    assert e("channels_first_moments_kernel<float, 4>") == ("channels_first_moments", True, False)
    assert e("channels_last_moments_kernel<double, 2>") == ("channels_last_moments", True, False)
    assert e("channels_last_moments_kernel<double, 1>") is None
    assert e("channels_first_normalize_kernel<__half, 8, fused_bn::common::Epilogue<X, true> >")[1:] == (True, True)
    assert e("channels_first_normalize_kernel<__half, 4, Epi>") is None  # 8 bytes: not a 16-byte path
    # grad_sums writes the residual's gradient only for GradSource 2 and 3 (kWritesResidualGrad)
    assert e("channels_last_grad_sums_kernel<float, 4, fused_bn::common::Identity, "
             "(fused_bn::common::GradSource)1>")[1:] == (True, False)
    assert e("channels_last_grad_sums_kernel<float, 4, fused_bn::common::Relu, "
             "(fused_bn::common::GradSource)2>")[1:] == (True, True)
    assert e("channels_first_grad_input_kernel<__nv_bfloat16, 8, true, A, (fused_bn::common::GradSource)0>")[1:] \
        == (True, True)
    assert e("two_values_backward_kernel<float, true, A, (fused_bn::common::GradSource)0>") is None

"""What readies minsota for GPUs and scale, checked where a CPU can: the MFU denominators (measured without
touching the training RNG; the datasheet table)."""

import torch

from minsota.runtime import datasheet_flops, peak_flops


def test_measuring_the_matmul_rate_leaves_the_training_rng_alone():
    peak_flops.cache_clear()
    before = torch.get_rng_state()
    assert peak_flops(torch.device("cpu"), torch.float32) > 1e9
    assert torch.equal(torch.get_rng_state(), before)


def test_datasheet_peaks_name_the_variant_before_the_family():
    assert datasheet_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert datasheet_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert datasheet_flops("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert datasheet_flops("NVIDIA A10G", torch.bfloat16) == 70e12
    assert datasheet_flops("NVIDIA L40S", torch.bfloat16) == 362e12
    assert datasheet_flops("NVIDIA A100-SXM4-80GB", None) is None  # fp32: no tensor-core figure to compare with
    assert datasheet_flops("Some Future GPU", torch.bfloat16) is None

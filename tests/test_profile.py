"""The fusion study: the traffic model against hand-computed numbers, the kernel counts against the
kernels that really run, and `fused-resnet profile` with its JSON and chart on a CPU."""

import json

import pytest
import torch
import torchvision
from conftest import DEVICE, HAS_CUDA
from fused_resnet.kernels import backend, igemm
from torch.profiler import ProfilerActivity, profile

from fused_resnet import __main__ as cli
from fused_resnet import bench, fuse, kernels
from fused_resnet.profile import (
    README_BEGIN,
    README_END,
    STEPS,
    _callables,
    _rates,
    _totals,
    executed_flops,
    format_table,
    layers,
    plot_roofline,
    traffic,
)
from fused_resnet.profile import profile as profile_model
from fused_resnet.validate import synthetic_batchnorm


def rows_of(arch, batch, size):
    rows = layers(getattr(torchvision.models, arch)(num_classes=10), batch, size)
    return {r.name: r for r in rows}


def test_traffic_of_a_basic_block_by_hand():
    # resnet18, batch 2, 32x32: the stem maps 32 -> 16 -> 8 (maxpool), layer2.0 maps 8x8x64 -> 4x4x128.
    rows = rows_of("resnet18", 2, 32)
    conv1, conv2, ds = rows["layer2.0.conv1"], rows["layer2.0.conv2"], rows["layer2.0.downsample"]
    x1, w1, y = 2 * 64 * 8 * 8, 128 * 64 * 3 * 3, 2 * 128 * 4 * 4  # 8192, 73728, 4096
    w2, wd = 128 * 128 * 3 * 3, 128 * 64  # 147456, 8192
    assert (conv1.x, conv1.w, conv1.y, conv2.x, conv2.w, ds.x, ds.w, ds.y) == (x1, w1, y, y, w2, x1, wd, y)
    # conv + BN + ReLU: the conv writes Y, BN and ReLU read and write it: X + W + 5Y, 3 kernels.
    assert traffic(conv1, "unfused", rows) == (8192 + 73728 + 5 * 4096, 3) == (102400, 3)
    assert traffic(conv1, "head", rows) == (8192 + 73728 + 4096, 1) == (86016, 1)
    # The last conv: conv Y, BN 2Y, add 3Y (two reads, one write), ReLU 2Y: X + W + 8Y, 4 kernels.
    assert traffic(conv2, "unfused", rows) == (4096 + 147456 + 8 * 4096, 4) == (184320, 4)
    assert traffic(conv2, "epilogue", rows) == (4096 + 147456 + 4096 + 3 * 4096, 2) == (167936, 2)
    assert traffic(conv2, "residual", rows) == (4096 + 147456 + 2 * 4096, 1) == (159744, 1)
    # Merged: the shortcut's input and weight are read by conv2's kernel, its output never exists.
    assert traffic(conv2, "downsample", rows) == (4096 + 147456 + 4096 + 8192 + 8192, 1) == (172032, 1)
    # downsample: conv + BN, X + W + 3Y unfused; nothing of its own once merged.
    assert traffic(ds, "unfused", rows) == (8192 + 8192 + 3 * 4096, 2) == (28672, 2)
    assert traffic(ds, "residual", rows) == (8192 + 8192 + 4096, 1)
    assert traffic(ds, "head", rows) == (0, 0)
    # An identity shortcut (layer1.0.conv2, 8x8x64): the residual is read in the epilogue.
    last = rows["layer1.0.conv2"]
    assert traffic(last, "unfused", rows) == (8192 + 36864 + 8 * 8192, 4) == (110592, 4)
    assert traffic(last, "head", rows) == (8192 + 36864 + 2 * 8192, 1) == (61440, 1)


def test_traffic_of_a_bottleneck_by_hand():
    # resnet50, batch 1, 32x32: layer1.0 takes 8x8x64 and gives 8x8x256, with a projection shortcut.
    rows = rows_of("resnet50", 1, 32)
    c1, c2, c3, ds = (rows[f"layer1.0.{n}"] for n in ("conv1", "conv2", "conv3", "downsample"))
    assert (c1.x, c1.w, c1.y) == (4096, 4096, 4096)
    assert (c2.x, c2.w, c2.y) == (4096, 36864, 4096)
    assert (c3.x, c3.w, c3.y) == (4096, 16384, 16384)
    assert (ds.x, ds.w, ds.y) == (4096, 16384, 16384)
    assert traffic(c1, "unfused", rows) == (4096 + 4096 + 5 * 4096, 3) == (28672, 3)
    assert traffic(c2, "head", rows) == (4096 + 36864 + 4096, 1) == (45056, 1)
    assert traffic(c3, "unfused", rows) == (4096 + 16384 + 8 * 16384, 4) == (151552, 4)
    assert traffic(c3, "residual", rows) == (4096 + 16384 + 2 * 16384, 1) == (53248, 1)
    assert traffic(c3, "head", rows) == (4096 + 16384 + 16384 + 4096 + 16384, 1) == (57344, 1)
    assert traffic(ds, "unfused", rows) == (4096 + 16384 + 3 * 16384, 2) == (69632, 2)
    # FLOPs: 2 * outputs * reduction.
    assert c2.flops == 2 * 4096 * 64 * 9 and ds.flops == 2 * 16384 * 64


def test_traffic_of_chained_blocks_by_hand():
    # resnet50, batch 1, 32x32: layer1.1's conv3 (8x8, 64 -> 256, + the block's input) chained
    # with layer1.2's conv1 (256 -> 64): X + W + 2Y (the residual read, y written) + W' + Z, one
    # kernel; layer1.2.conv1's own row then moves nothing. layer4 (512 channels) does not chain.
    rows = rows_of("resnet50", 1, 32)
    last, following = rows["layer1.1.conv3"], rows["layer1.2.conv1"]
    assert last.chains == "layer1.2.conv1" and following.chained
    assert traffic(last, "head", rows) == (4096 + 16384 + 2 * 16384, 1)
    assert traffic(last, "chain", rows) == (4096 + 16384 + 2 * 16384 + 16384 + 4096, 1) == (73728, 1)
    assert traffic(following, "head", rows) == (16384 + 16384 + 4096, 1)
    assert traffic(following, "chain", rows) == (0, 0)
    assert executed_flops(last, "chain", rows) == last.flops + following.flops
    assert executed_flops(following, "chain", rows) == 0
    # layer1.0's conv3 with its merged projection shortcut (8x8x64 -> 256 at stride 1), chained too:
    # its own X + W + Y + the shortcut's X and W, then W' + Z.
    first, ds = rows["layer1.0.conv3"], rows["layer1.0.downsample"]
    assert traffic(first, "chain", rows) == (4096 + 16384 + 16384 + ds.x + ds.w + 16384 + 4096, 1)
    assert executed_flops(first, "chain", rows) == first.flops + ds.flops + rows["layer1.1.conv1"].flops
    # A stage's last block chains with the next stage's first (layer1.2 with layer2.0's conv1); not
    # layer3.5 (layer4.0's conv1 makes 512 channels), nor layer4.
    assert rows["layer1.2.conv3"].chains == "layer2.0.conv1" and rows["layer2.0.conv1"].chained
    assert [r.name for r in rows.values() if r.chains] == [f"{b}.conv3" for b in (
        "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer2.3", "layer3.0", "layer3.1",
        "layer3.2", "layer3.3", "layer3.4")]


def test_traffic_of_3x3_heads_by_hand():
    # resnet50, batch 1, 32x32, with chain_3x3: layer1.1's conv3 kernel reads the 3x3's input (8x8x64)
    # and weight (64x64x3x3) in place of the 3x3's output, which is never stored: the 3x3's row moves
    # nothing. Chained with layer1.2's conv1 as well: + W' + Z, as before.
    rows = rows_of("resnet50", 1, 32)
    last, head = rows["layer1.1.conv3"], rows["layer1.1.conv2"]
    assert last.head == "layer1.1.conv2" and head.in_head
    x3, w3 = 4096, 64 * 64 * 9
    assert traffic(head, "chain", rows) == (4096 + w3 + 4096, 1) and traffic(head, "chain3x3", rows) == (0, 0)
    assert traffic(last, "chain3x3", rows) == (x3 + w3 + 16384 + 2 * 16384 + 16384 + 4096, 1)
    assert executed_flops(last, "chain3x3", rows) == last.flops + head.flops + rows["layer1.2.conv1"].flops
    assert executed_flops(head, "chain3x3", rows) == 0
    # layer2.0: its 3x3 of stride 2 (8x8x128 -> 4x4x128) inside conv3 with the merged shortcut
    # (from 8x8x256 at stride 2), and layer2.1's conv1.
    last, head, ds = rows["layer2.0.conv3"], rows["layer2.0.conv2"], rows["layer2.0.downsample"]
    assert traffic(last, "chain3x3", rows) == (head.x + head.w + last.w + last.y + ds.x + ds.w
                                              + rows["layer2.1.conv1"].w + rows["layer2.1.conv1"].y, 1)
    # layer4 (512-channel 3x3s) keeps its 3x3s apart.
    assert [r.name for r in rows.values() if r.head] == [f"{b}.conv3" for b in (
        "layer1.0", "layer1.1", "layer1.2", "layer2.0", "layer2.1", "layer2.2", "layer2.3",
        "layer3.0", "layer3.1", "layer3.2", "layer3.3", "layer3.4", "layer3.5")]


def test_traffic_of_the_stem_and_head_by_hand(monkeypatch):
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", False)  # the stem's conv reads the image itself
    rows = rows_of("resnet18", 2, 32)
    stem, head = rows["conv1"], rows["fc"]
    x, w, y, pooled = 2 * 3 * 32 * 32, 64 * 3 * 7 * 7, 2 * 64 * 16 * 16, 2 * 64 * 8 * 8  # 6144, 9408, 32768, 8192
    # conv, BN (2Y), ReLU (2Y), max pool (reads Y, writes the pooled map): X + W + 6Y + pooled.
    assert traffic(stem, "unfused", rows) == (x + w + 6 * y + pooled, 4) == (220352, 4)
    assert traffic(stem, "epilogue", rows) == (x + w + 2 * y + pooled, 2)
    assert traffic(stem, "stem", rows) == (x + w + pooled, 1) == (23744, 1)
    assert executed_flops(stem, "epilogue") == 2 * y * 3 * 7 * 7
    # 3x3/2 windows over a 16x16 map: 9 taps for each of the 8x8 pooled pixels, 9/4 of the conv.
    assert stem.recompute == 9 * 64 / 256
    assert executed_flops(stem, "stem") == 2 * y * 3 * 7 * 7 * 9 // 4 == 21_676_032
    # avgpool reads the map and writes (N, C); fc reads that and the weight and writes (N, classes).
    x, pooled, w, out = 2 * 512, 2 * 512, 10 * 512, 2 * 10
    assert traffic(head, "stem", rows) == (x + 2 * pooled + w + out, 2) == (8212, 2)
    assert traffic(head, "head", rows) == (x + w + out, 1) == (6164, 1)


def test_traffic_of_the_stem_as_space_to_depth_by_hand(monkeypatch):
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", True)
    stem = rows_of("resnet18", 2, 32)["conv1"]
    x, w, y, pooled = 2 * 3 * 32 * 32, 64 * 3 * 7 * 7, 2 * 64 * 16 * 16, 2 * 64 * 8 * 8
    # The 16x16 outputs of a 4x4 filter over 2x2 blocks read 19x19 blocks of 16 channels; the pooled
    # kernel keeps a margin of one block (the pool's padding) around them: 21x21.
    blocks, pool_blocks = 2 * 19 * 19 * 16, 2 * 21 * 21 * 16  # 11552, 14112
    assert (stem.blocks, stem.pool_blocks) == (blocks, pool_blocks)
    # One kernel more, which reads X and writes the blocks, which the conv then reads instead of X.
    assert traffic(stem, "unfused") == (x + w + 6 * y + pooled, 4)
    assert traffic(stem, "epilogue") == (x + w + 2 * y + pooled + 2 * blocks, 3)
    assert traffic(stem, "stem") == (x + w + pooled + 2 * pool_blocks, 2) == (51968, 2)
    # A 4x4 filter over 16 channels: 256 multiply-adds an output for the 7x7 over 3's 147.
    assert executed_flops(stem, "unfused") == 2 * y * 147
    assert executed_flops(stem, "epilogue") == 2 * y * 256
    assert executed_flops(stem, "stem") == 2 * y * 256 * 9 // 4 == 37_748_736


def test_executed_flops_of_bundled_groups_by_hand():
    # resnext50_32x4d: layer1's 3x3 has 32 groups of 4 channels, run 16 at a time as groups of 64
    # (kernels.igemm.bundle_groups): 16 times the multiply-adds once fused; layer4's, 32 groups of
    # 32, two at a time. Ungrouped convs run as they are.
    rows = rows_of("resnext50_32x4d", 2, 32)
    first, last, plain = rows["layer1.0.conv2"], rows["layer4.0.conv2"], rows["layer1.0.conv1"]
    assert first.flops == 2 * (2 * 128 * 8 * 8) * 4 * 3 * 3
    assert last.flops == 2 * (2 * 1024 * 1 * 1) * 32 * 3 * 3
    assert (first.bundle, last.bundle, plain.bundle) == (16, 2, 1)
    for row, bundle in ((first, 16), (last, 2), (plain, 1)):
        assert executed_flops(row, "fold", rows) == row.flops
        assert executed_flops(row, "epilogue", rows) == executed_flops(row, "head", rows) == bundle * row.flops
    # A block's last conv adds its merged shortcut's FLOPs (ungrouped) to its own.
    conv3, ds = rows["layer1.0.conv3"], rows["layer1.0.downsample"]
    assert executed_flops(conv3, "head", rows) == conv3.flops + ds.flops


UNFUSED_TORCH_OPS = ("aten::max_pool2d", "aten::adaptive_avg_pool2d", "aten::linear")


@pytest.mark.skipif(HAS_CUDA, reason="counts the kernels of plans built untimed: on a GPU a first call may "
                                        "choose another way to run the stem or a chain")
@pytest.mark.parametrize("arch,step,blocked", [("resnet18", step, True) for step in STEPS[2:]]
                         + [("resnet18", "epilogue", False), ("resnet18", "stem", False),
                            ("resnet50", "chain", True), ("resnet50", "chain3x3", True)])
def test_kernel_counts_match_the_kernels_that_run(arch, step, blocked, monkeypatch):
    # The model's kernel count at each Triton step against the kernels the fused network really
    # launches: its Triton kernels (with the stem as space_to_depth, its copy among them), and
    # torch's ops for what the step leaves unfused.
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", blocked)
    model = synthetic_batchnorm(getattr(torchvision.models, arch)(num_classes=10), size=32)
    _, backend_name, switches = next(s for s in bench.ABLATION if s[0] == step)
    fused = fuse(model, **switches).to(DEVICE)
    rows = layers(model, 1, 32)
    assert (rows[0].blocks > 0) == blocked
    expected = sum(traffic(r, step, {r.name: r for r in rows})[1] for r in rows)
    launched = []
    launch = backend.KernelLaunch.__call__

    def counted(self, *tensors):
        launched.append(self.kernel)
        return launch(self, *tensors)

    monkeypatch.setattr(backend.KernelLaunch, "__call__", counted)
    with kernels.use_backend(backend_name), torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fused(torch.randn(1, 3, 32, 32, device=DEVICE))
    counts = {e.key: e.count for e in prof.key_averages() if e.key in UNFUSED_TORCH_OPS}
    assert len(launched) + sum(counts.values()) == expected, (launched, counts)
    assert (igemm._space_to_depth_kernel in launched) == blocked


def test_profile_command_on_cpu(tmp_path, capsys):
    out, png, readme = tmp_path / "profile.json", tmp_path / "roofline.png", tmp_path / "README.md"
    readme.write_text(f"# guide\n{README_BEGIN}\nPLACEHOLDER\n{README_END}\nafter\n")
    cli.main(["profile", "--arch", "resnet18", "--batch", "2", "--size", "32", "--dtype", "float32",
              "--device", "cpu", "--json", str(out), "--plot", str(png), "--readme", str(readme), "--quiet"])
    guide = readme.read_text()
    assert "PLACEHOLDER" not in guide and guide.endswith(f"{README_END}\nafter\n")
    assert "`fused-resnet profile --arch resnet18 --batch 2 --size 32 --dtype float32 --device cpu`" in guide
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert [r["layer"] for r in rows][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert len(rows) == 1 + 16 + 3 + 1  # stem, 8 blocks of 2 convs, 3 downsamples, head
    assert payload["analytic_only"] and "unfused_ms" not in rows[0]
    totals = payload["totals"]
    for key in ("unfused_bytes", "fused_bytes", "unfused_kernels", "fused_kernels", "flops"):
        assert totals[key] == sum(r[key] for r in rows)
    assert totals["bytes_saved"] == totals["unfused_bytes"] - totals["fused_bytes"] > 0
    assert rows[0]["unfused_bytes"] == 220352 * 4  # the hand-computed stem above, in fp32 bytes
    steps = payload["ablation"]
    assert [s["step"] for s in steps] == list(STEPS)
    assert all(a["bytes"] >= b["bytes"] for a, b in zip(steps, steps[1:]))
    assert steps[0]["bytes"] == totals["unfused_bytes"] and steps[-1]["bytes"] == totals["fused_bytes"]
    assert steps[-1]["kernels"] == totals["fused_kernels"] and all(s["ms"] is None for s in steps)
    assert {"gpu", "torch", "command", "date"} <= set(payload["provenance"])
    printed = capsys.readouterr().out
    assert "analytic only (no GPU)" in printed and "| head |" in printed
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert height > 100 and width > 100


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_profile_command_measures_on_a_gpu(tmp_path):
    out = tmp_path / "profile.json"
    cli.main(["profile", "--arch", "resnet18", "--batch", "8", "--size", "64", "--dtype", "float16", "--iters", "3",
              "--json", str(out), "--quiet"])
    payload = json.loads(out.read_text())
    assert not payload["analytic_only"]
    assert all(r["unfused_ms"] > 0 for r in payload["rows"])
    assert all(r["fused_ms"] > 0 for r in payload["rows"] if r["fused_kernels"])
    assert all(s["ms"] > 0 for s in payload["ablation"])


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_each_rows_unfused_and_fused_kernels_compute_the_same(arch):
    # What a GPU profile times per row: torchvision's modules and the fused module, on one input.
    model = synthetic_batchnorm(getattr(torchvision.models, arch)(num_classes=10), size=32)
    fused = fuse(model)
    ref = model.to(memory_format=torch.channels_last)
    checked = 0
    with kernels.use_backend("reference"), torch.no_grad():
        for layer in layers(model, 2, 32):
            unfused_fn, fused_fn = _callables(layer, ref, fused, torch.float32, torch.device("cpu"))
            expected = unfused_fn()
            if fused_fn is None:
                assert layer.kind == "downsample"
                continue
            torch.testing.assert_close(fused_fn(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
            checked += 1
    assert checked == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules()) + 1 - \
        sum(getattr(b, "downsample", None) is not None for b in model.modules())


def test_measured_columns_table_and_chart(tmp_path, monkeypatch):
    # The GPU-only columns, filled with made-up times: rates, roof share, table and chart.
    monkeypatch.setattr(igemm, "SPACE_TO_DEPTH", True)
    result = profile_model(synthetic_batchnorm(torchvision.models.resnet18(), size=32), batch=2, size=32,
                           dtype=torch.float16, device=torch.device("cpu"), ablation=False)
    result["analytic_only"] = False
    for row in result["rows"]:
        row["unfused_ms"], row["fused_ms"] = 0.2, (0.1 if row["fused_kernels"] else None)
        _rates(row, (1e15, 1e12, "test GPU"))
    result["totals"] = _totals(result["rows"])
    stem = result["rows"][0]
    # By hand (test_traffic_of_the_stem_as_space_to_depth_by_hand): the stem at batch 2, 32x32
    # computes 2 * 32768 outputs * 256 taps * 9/4 = 37,748,736 FLOPs fused and moves 51,968 fp16
    # elements = 103,936 bytes. In 0.1 ms: 0.3775 TFLOP/s and 1.0394 GB/s. Under roofs of 1e15
    # FLOP/s and 1e12 B/s it is bound by memory (103.9 ns against 37.7 ns of compute): 0.1039% of
    # the roof.
    assert (stem["fused_flops"], stem["fused_bytes"]) == (37_748_736, 103_936)
    assert stem["fused_tflops"] == pytest.approx(0.37748736, rel=1e-6)
    assert stem["fused_gbps"] == pytest.approx(1.03936, rel=1e-6)
    assert stem["fused_roof_pct"] == pytest.approx(0.103936, rel=1e-6)
    assert stem["space_to_depth_bytes"] == 2 * 14112 * 2  # the pooled stem's blocks, written and read, in fp16
    text = format_table(result)
    assert "ms fused" in text and "merged" in text
    assert "4.24+" in text.splitlines()[2] and "2x2 blocks of pixels (space-to-depth)" in text
    plot_roofline(result, tmp_path / "measured.png", "made-up times")
    assert (tmp_path / "measured.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_that_carry_a_merged_shortcut_are_explained():
    result = profile_model(torchvision.models.resnet50(num_classes=10), batch=1, size=32, dtype=torch.float16,
                           device=torch.device("cpu"), ablation=False)
    carriers = [r for r in result["rows"] if r["merged_shortcut"]]
    assert [r["layer"] for r in carriers] == [f"layer{i}.0.conv3" for i in range(1, 5)]
    assert [r["merged_shortcut"] for r in carriers] == [f"layer{i}.0.downsample" for i in range(1, 5)]
    lines = format_table(result).splitlines()
    marked = [line.split()[0] for line in lines if len(line.split()) == 7 and line.split()[-2].endswith("*")]
    assert marked == [r["layer"] for r in carriers]
    footnote = next(line for line in lines if line.startswith("* "))
    assert "layer1.0.downsample and 3 more" in footnote and "shortcut's input and weight" in footnote

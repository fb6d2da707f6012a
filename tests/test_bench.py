"""`capsx bench` runs both paths and reports what it promises (the figures themselves are for `make bench`)."""

import json

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from capsx.cli import app
from tests.conftest import REPO, tiny_recipe


def test_bench_json_has_the_promised_keys_and_logs_to_mlflow(workdir, monkeypatch):
    monkeypatch.setenv("CAPSX_CONV_ALGORITHM", "fourier")  # the arithmetic's claim below is the transform's
    res = CliRunner().invoke(app, ["bench", str(REPO / "recipes" / "mnist-capsnet.yaml"), "--rounds", "1",
                                   "--steps", "1", "--batch", "32", "--infer-batch", "8", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for key in ("train_images_per_s", "infer_images_per_s", "peak_rss_mb", "gflops_achieved", "matmul_peak_gflops",
                "reference_train_images_per_s", "train_speedup", "infer_speedup"):
        assert key in out, key
    assert out["train_images_per_s"] > 0 and out["matmul_peak_gflops"] > 0
    # fp32: the frequency-domain PrimaryCaps does less arithmetic than the direct convolution it replaces
    assert 0 < out["gflops_computed"] < 0.7 * out["gflops_achieved"]
    forced = "fourier (forced by CAPSX_CONV_ALGORITHM)"  # Conv1's and PrimaryCaps', training and inference
    assert out["paths"] == {"1x28x28->256 k9 s1 float32 train batch 32": forced,
                            "1x28x28->256 k9 s1 float32 infer batch 8": forced,
                            "256x20x20->256 k9 s2 float32 train batch 32": forced,
                            "256x20x20->256 k9 s2 float32 infer batch 8": forced}
    client = MlflowClient(f"sqlite:///{workdir}/runs/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    assert run.data.metrics["train_images_per_s"] == out["train_images_per_s"]


def test_bench_refuses_a_cnn_recipe(workdir):
    res = CliRunner().invoke(app, ["bench", str(REPO / "recipes" / "mnist-cnn.yaml"), "--no-track"])
    assert res.exit_code == 2 and "compares CapsNet paths" in res.output


def _tiny_capsnet_recipe(workdir) -> str:
    path = workdir / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe()))
    return str(path)


def test_bench_runs_on_the_cpu_unless_told_otherwise(workdir):
    res = CliRunner().invoke(app, ["bench", _tiny_capsnet_recipe(workdir), "--rounds", "1", "--steps", "1",
                                   "--batch", "4", "--infer-batch", "4", "--json", "--no-track"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["device"].startswith("cpu (") and out["peak_gpu_mb"] is None
    assert out["matmul_peak_note"] == "fp32 matmul on cpu" and out["routing"] == "dynamic"
    # Conv1's and PrimaryCaps' conv algorithms measured for the training and the inference batch, each
    # timing reported (this tiny Conv1's 81 taps exceed its 16 channels: no im2col candidate)
    assert len(out["paths"]) == 4 and all(" ms direct (" in why for why in out["paths"].values()), out["paths"]
    assert not any("im2col" in why for why in out["paths"].values())


def test_bench_times_the_routing_set_on_the_command_line_on_both_paths_with_the_same_weights(workdir):
    res = CliRunner().invoke(app, ["bench", _tiny_capsnet_recipe(workdir), "--set", "model.routing=attention",
                                   "--rounds", "1", "--steps", "1", "--batch", "4", "--infer-batch", "4", "--json",
                                   "--no-track"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["routing"] == "attention"
    from capsx.jobs.bench import bench_models
    from capsx.recipe import recipe_from_dict

    for routing in ("leaky", "none", "attention"):
        raw = tiny_recipe()
        raw["model"]["routing"] = routing
        fast, ref = bench_models(recipe_from_dict(raw, "t"))
        assert fast.class_caps.routing == ref.class_caps.routing == routing
        x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            torch.testing.assert_close(fast.eval()(x).capsules, ref.eval()(x).capsules, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_on_cuda_without_cuda_is_one_error_line(workdir):
    res = CliRunner().invoke(app, ["bench", _tiny_capsnet_recipe(workdir), "--device", "cuda", "--no-track"])
    assert res.exit_code == 2
    assert res.output.strip().splitlines() == ["error: device 'cuda' is not available here; available: cpu "
                                               "(or use device: auto)"]


def test_bench_fp16_needs_cuda(workdir):
    res = CliRunner().invoke(app, ["bench", _tiny_capsnet_recipe(workdir), "--precision", "fp16", "--no-track"])
    assert res.exit_code == 2 and len(res.output.strip().splitlines()) == 1
    assert "fp16 needs --device cuda" in res.output


def test_the_two_paths_start_from_the_same_weights_and_compute_the_same_function():
    from capsx.jobs.bench import bench_models
    from capsx.recipe import recipe_from_dict

    torch.manual_seed(0)
    fast, ref = bench_models(recipe_from_dict(tiny_recipe(), "t"))
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), ref.state_dict().values(), strict=True))
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fast.eval()(x), ref.eval()(x)
    torch.testing.assert_close(a.capsules, b.capsules, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-4, atol=1e-6)


def test_bf16_bench_steps_run_under_bf16_autocast_and_its_peak_is_timed_the_same_way(workdir):
    from capsx.jobs import bench
    from capsx.recipe import recipe_from_dict

    recipe = recipe_from_dict(tiny_recipe(), "t")
    fast, _ = bench.bench_models(recipe)
    seen: list[object] = []
    fast.class_caps.register_forward_hook(
        lambda m, i, o: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(6, (4,))
    bench._train_rate(fast, recipe.loss_config, x, y, 2, "bf16")
    bench._infer_rate(fast, x, "bf16")
    bench._infer_rate(fast, x, "fp32")
    assert seen == [torch.bfloat16] * 3 + [None]  # two training steps, one inference; fp32 without autocast

    res = CliRunner().invoke(app, ["bench", _tiny_capsnet_recipe(workdir), "--rounds", "1", "--steps", "1",
                                   "--batch", "4", "--infer-batch", "4", "--json", "--no-track", "--precision", "bf16"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["precision"] == "bf16" and out["matmul_peak_note"].startswith("bf16 matmul on cpu (fp32 operands")


def test_the_matmul_peak_shrinks_its_product_to_fit_its_time():
    from capsx.jobs.bench import product_size

    assert product_size(1e-4, 2048, 5, 5.0) == 2048  # fp32 here: 2048 takes ~0.2 s
    assert product_size(0.02, 2048, 5, 5.0) == 512  # bf16 bare on a CPU without bf16 units: 1.5 GFLOP/s
    assert product_size(10.0, 2048, 5, 5.0) == 256  # never below 256

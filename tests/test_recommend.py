"""Tests of the choice policy (registry.recommend), the serving settings and `qreg recommend`."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from registry.cli.main import cli
from registry.cli.recommend_cmd import serving_options
from registry.device import Device
from registry.errors import NothingFitsError, UsageError
from registry.estimate import estimate_memory
from registry.manifest import load_manifest
from registry.recommend import HEADROOM, quality_order, recommend
from registry.serving import ServeSettings
from registry.units import GB, GIB, MIB

X86 = frozenset({"avx2", "avx512f"})


def make_device(ram: int | None = 64 * GIB, **changes) -> Device:
    """Return a device value (plain data, nothing is detected) with `ram` available."""
    device = Device(
        system="Linux",
        machine="x86_64",
        backend="cpu",
        cpu_cores=8,
        ram_total_bytes=ram,
        ram_available_bytes=ram,
        cpu_features=X86,
    )
    return replace(device, **changes)


@pytest.fixture(scope="module")
def manifest():
    return load_manifest()


def need(manifest, name: str, settings: ServeSettings, features=X86) -> int:
    """Return the RAM a variant needs with headroom, as recommend() computes it."""
    estimate = estimate_memory(manifest.model, manifest.resolve(name), settings, cpu_features=features)
    return int(estimate.ram_bytes * (1 + HEADROOM))


@pytest.fixture
def no_gpu_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide any real nvidia-smi, so the detected backend is the CPU on Linux test machines."""
    kept = [entry for entry in os.environ["PATH"].split(os.pathsep) if not (Path(entry) / "nvidia-smi").exists()]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))


# Quality order --------------------------------------------------------------------------------


def names(variants) -> list[str]:
    return [variant.name for variant in variants]


def test_order_bpw_first(manifest):
    order = names(quality_order(manifest.variants))
    assert order[:3] == ["BF16", "Q8_0", "Q6_K"]
    assert order[-2:] == ["IQ1_M", "IQ1_S"]


def test_order_q4_k_m_below_q3_k_m(manifest):
    order = names(quality_order(manifest.variants))
    # Q4_K_M (+0.65 PPL) is worse than the smaller Q3_K_M (+0.62), so it sits just below it.
    assert order.index("Q4_K_M") == order.index("Q3_K_M") + 1
    assert order.index("IQ4_XS") < order.index("Q3_K_M")


def test_order_ignores_negative_delta(manifest):
    # Q3_K_S reports -66 PPL (an artifact); were it used, it would demote every larger variant with a delta.
    order = names(quality_order(manifest.variants))
    assert order.index("Q3_K_M") < order.index("Q3_K_S")
    assert order.index("BF16") == 0


def test_order_demotion_chain(manifest):
    base = manifest.resolve("Q6_K")
    small = replace(base, name="S", bits_per_weight=4.0, ppl_delta=0.5)
    middle = replace(base, name="M", bits_per_weight=5.0, ppl_delta=0.6)
    large = replace(base, name="L", bits_per_weight=6.0, ppl_delta=0.7)
    other = replace(base, name="X", bits_per_weight=4.5, ppl_delta=None)
    assert names(quality_order([large, middle, small, other])) == ["X", "S", "M", "L"]


def test_order_equal_delta_no_demotion(manifest):
    base = manifest.resolve("Q6_K")
    small = replace(base, name="S", bits_per_weight=4.0, ppl_delta=0.5)
    large = replace(base, name="L", bits_per_weight=6.0, ppl_delta=0.5)
    assert names(quality_order([small, large])) == ["L", "S"]


# Picks --------------------------------------------------------------------------------------


def test_plenty_of_memory_picks_q8_0(manifest):
    result = recommend(manifest, make_device(), ServeSettings())
    assert result.pick.name == "Q8_0"
    assert "BF16" in result.reason
    assert "--include-reference" in result.reason


def test_include_reference_picks_bf16(manifest):
    result = recommend(manifest, make_device(), ServeSettings(), include_reference=True)
    assert result.pick.name == "BF16"
    assert "ranks first" in result.reason


@pytest.mark.parametrize("backend", ["metal", "cuda"])
def test_trade_off_point_picks_q3_k_m(manifest, backend):
    # Without CPU repacking the needs follow the file sizes, so a budget between
    # Q3_K_M's need and the next larger variant's picks the card's trade-off choice.
    settings = ServeSettings(ctx=512, backend=backend)
    gpu_device = make_device(backend=backend, gpus=()) if backend == "metal" else make_device(backend=backend)
    if backend == "metal":
        q3 = need(manifest, "Q3_K_M", settings)
        result = recommend(manifest, gpu_device, settings, ram_bytes=q3 + MIB)
    else:
        q3 = estimate_memory(manifest.model, manifest.resolve("Q3_K_M"), settings).vram_bytes
        result = recommend(manifest, gpu_device, settings, ram_bytes=64 * GIB, vram_bytes=int(q3 * (1 + HEADROOM)) + MIB)
    assert result.pick.name == "Q3_K_M"
    assert "too large" in result.reason


def test_only_restricts_pick(manifest):
    result = recommend(manifest, make_device(), ServeSettings(ctx=512), only={"Q4_K_M", "Q2_K"})
    assert result.pick.name == "Q4_K_M"
    excluded = [item for item in result.ranked if not item.eligible]
    assert all(item.variant.name not in ("Q4_K_M", "Q2_K") for item in excluded)
    assert len(result.ranked) == len(manifest.variants)


def test_never_tq_even_when_only_tq_fits(manifest):
    result = recommend(manifest, make_device(), ServeSettings(ctx=512), only={"TQ1_0", "TQ2_0"}, allow_low_quality=True)
    assert result.pick is None
    for item in result.ranked:
        if item.variant.name.startswith("TQ"):
            assert item.reason.startswith("unusable")


def test_metal_excludes_tq(manifest):
    result = recommend(manifest, make_device(backend="metal"), ServeSettings(ctx=512, backend="metal"))
    reasons = {item.variant.name: item.reason for item in result.ranked}
    assert reasons["TQ1_0"] == "not supported on metal"
    assert reasons["TQ2_0"] == "not supported on metal"


def test_low_quality_needs_flag(manifest):
    settings = ServeSettings(ctx=512)
    budget = need(manifest, "IQ1_M", settings) + MIB
    assert budget < need(manifest, "IQ2_XXS", settings)

    without = recommend(manifest, make_device(), settings, ram_bytes=budget)
    assert without.pick is None
    with_flag = recommend(manifest, make_device(), settings, ram_bytes=budget, allow_low_quality=True)
    assert with_flag.pick.name == "IQ1_M"


def test_pick_fits_with_headroom(manifest):
    settings = ServeSettings(ctx=2048)
    budget = 4 * GIB
    result = recommend(manifest, make_device(), settings, ram_bytes=budget)
    entry = result.pick_entry
    assert entry.estimate.ram_bytes * (1 + HEADROOM) <= budget
    for item in result.ranked[: entry.rank - 1]:
        assert not item.fits or not item.eligible, item.variant.name


def test_nothing_fits_reason_and_suggestions(manifest):
    # A micro-batch of the whole context makes the two vocabulary-sized buffers most of the need.
    settings = ServeSettings(ctx=8192, ubatch_size=8192)
    result = recommend(manifest, make_device(), settings, ram_bytes=2 * GB)
    assert result.pick is None
    assert "no variant fits" in result.reason
    assert "smallest eligible" in result.reason
    assert "logits" in result.reason
    ctx_hint = [text for text in result.suggestions if text.startswith("--ctx ")]
    assert ctx_hint
    ctx = int(ctx_hint[0].split()[1])
    assert ctx % 256 == 0
    assert recommend(manifest, make_device(), replace(settings, ctx=ctx), ram_bytes=2 * GB).pick is not None


def test_nothing_fits_suggests_smaller_ubatch(manifest):
    result = recommend(manifest, make_device(), ServeSettings(ctx=8192), ram_bytes=2 * GB)
    assert result.pick is None
    assert "logits" not in result.reason  # the KV cache, not the buffers, is the largest term here
    ubatch_hint = [text for text in result.suggestions if text.startswith("--ubatch ")]
    assert ubatch_hint == ["--ubatch 256 (then Q5_1 fits)"]
    smaller = recommend(manifest, make_device(), ServeSettings(ctx=8192, ubatch_size=256), ram_bytes=2 * GB)
    assert smaller.pick.name == "Q5_1"


def test_no_ubatch_hint_below_minimum(manifest):
    # At --ctx 64 the micro-batch is already 64 tokens, the smallest that is suggested.
    settings = ServeSettings(ctx=64)
    result = recommend(manifest, make_device(), settings, ram_bytes=100 * MIB)
    assert result.pick is None
    assert not any(text.startswith("--ubatch") for text in result.suggestions)


def test_nothing_fits_suggests_quantized_cache(manifest):
    # At 32768 tokens the f16 KV cache is 3.5 GiB; a q8_0 cache halves it.
    settings = ServeSettings(ctx=32768)
    smallest_q8 = need(manifest, "IQ2_XXS", replace(settings, cache_type="q8_0"))
    result = recommend(manifest, make_device(), settings, ram_bytes=smallest_q8 + MIB)
    assert result.pick is None
    assert any(text.startswith("--cache-type q8_0") for text in result.suggestions)


def test_nothing_fits_suggests_one_slot(manifest):
    settings = ServeSettings(ctx=2048, parallel=8)
    budget = need(manifest, "Q4_0", replace(settings, parallel=1))
    result = recommend(manifest, make_device(), settings, ram_bytes=budget)
    assert result.pick is None
    assert any(text.startswith("--parallel 1") for text in result.suggestions)


def test_budget_needs_ram_when_undetected(manifest):
    with pytest.raises(UsageError) as caught:
        recommend(manifest, make_device(ram=None), ServeSettings())
    assert "--ram" in caught.value.one_line()


def test_budget_cuda_needs_vram(manifest):
    with pytest.raises(UsageError) as caught:
        recommend(manifest, make_device(), ServeSettings(backend="cuda"))
    assert "--vram" in caught.value.one_line()


def test_cuda_vram_limits_pick(manifest):
    settings = ServeSettings(ctx=512, backend="cuda")
    small = recommend(manifest, make_device(), settings, vram_bytes=2 * GIB)
    assert small.pick.name == "Q8_0"
    tiny = recommend(manifest, make_device(), settings, vram_bytes=300 * MIB)
    assert tiny.pick is None
    assert "VRAM" in tiny.reason


def test_metal_budget_limits_pick(manifest):
    settings = ServeSettings(ctx=512, backend="metal")
    device = make_device(backend="metal", metal_budget_bytes=400 * MIB)
    result = recommend(manifest, device, settings)
    assert result.pick is None
    assert "Metal" in result.reason


def test_detected_ram_source_named(manifest):
    result = recommend(manifest, make_device(ram=64 * GIB), ServeSettings())
    assert "available RAM, detected" in result.reason
    assert result.budget.ram_source.startswith("available RAM")


def test_to_dict_has_terms_and_ranking(manifest):
    data = recommend(manifest, make_device(), ServeSettings(ctx=512)).to_dict()
    assert data["pick"] == "Q8_0"
    assert set(data["estimate"]["terms"]) >= {"weights", "kv_cache", "output_buffer", "compute_buffer", "runtime_overhead"}
    assert len(data["ranked"]) == 30
    assert data["ranked"][1]["fits"] is True
    json.dumps(data)


# ServeSettings.from_options ---------------------------------------------------------------------


def test_from_options_defaults():
    settings = ServeSettings.from_options(model_context=32768)
    assert (settings.ctx, settings.parallel, settings.cache_type, settings.backend) == (8192, 1, "f16", "cpu")
    assert (settings.ubatch_size, settings.ubatch, settings.batch) == (512, 512, 512)
    assert settings.sources == {
        "ctx": "default", "parallel": "default", "cache_type": "default", "backend": "default", "ubatch": "default",
    }


def test_from_options_precedence(monkeypatch, isolated_user_dirs):
    from registry.config import write_setting

    write_setting("serve.ctx", "1024")
    write_setting("serve.parallel", "3")
    write_setting("serve.ubatch", "128")
    monkeypatch.setenv("QREG_CTX", "2048")
    settings = ServeSettings.from_options(cache_type="q8_0", detected_backend="metal", model_context=32768)
    assert settings.ctx == 2048
    assert settings.parallel == 3
    assert settings.cache_type == "q8_0"
    assert settings.backend == "metal"
    assert settings.ubatch == 128
    assert settings.sources == {
        "ctx": "env", "parallel": "config", "cache_type": "option", "backend": "detected", "ubatch": "config",
    }
    assert ServeSettings.from_options(ctx=4096).ctx == 4096
    assert ServeSettings.from_options(ubatch=64).ubatch == 64


def test_ubatch_capped_at_ctx():
    settings = ServeSettings.from_options(ctx=300, ubatch=4096)
    assert settings.ubatch_size == 4096
    assert settings.ubatch == 300
    assert settings.batch == 300
    assert settings.to_dict()["ubatch"] == 300
    assert settings.to_dict()["ubatch_size"] == 4096


def test_from_options_flags_for_quantized_cache():
    assert ServeSettings.from_options(cache_type="q4_0").flash_attn == "on"
    assert ServeSettings.from_options(cache_type="f16").flash_attn is None


@pytest.mark.parametrize(
    "options,expected",
    [
        ({"ctx": 0}, "invalid --ctx 0"),
        ({"ctx": -5}, "invalid --ctx -5"),
        ({"ctx": 40000}, "the model's context is 32768 tokens"),
        ({"parallel": 0}, "invalid --parallel 0"),
        ({"ubatch": 0}, "invalid --ubatch 0: the micro-batch size must be 1 or more tokens"),
        ({"ubatch": -512}, "invalid --ubatch -512"),
        ({"cache_type": "q5_1"}, "f16, q8_0, q4_0"),
        ({"backend": "tpu"}, "cpu, cuda, metal, vulkan"),
    ],
)
def test_from_options_rejects(options, expected):
    with pytest.raises(UsageError) as caught:
        ServeSettings.from_options(model_context=32768, **options)
    assert caught.value.exit_code == 2
    assert expected in caught.value.one_line()


def test_from_options_bad_env(monkeypatch):
    monkeypatch.setenv("QREG_PARALLEL", "0")
    with pytest.raises(UsageError) as caught:
        ServeSettings.from_options()
    assert "QREG_PARALLEL" in caught.value.one_line()


def test_from_options_bad_env_ubatch(monkeypatch):
    monkeypatch.setenv("QREG_UBATCH", "0")
    with pytest.raises(UsageError) as caught:
        ServeSettings.from_options()
    assert "invalid value '0' for serve.ubatch from QREG_UBATCH" in caught.value.one_line()


def test_from_options_bad_config_cache_type(isolated_user_dirs):
    config = isolated_user_dirs / "config" / "qreg" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('[serve]\ncache_type = "q3"\n')
    with pytest.raises(UsageError) as caught:
        ServeSettings.from_options()
    assert "serve.cache_type" in caught.value.one_line()
    assert config.read_text() == '[serve]\ncache_type = "q3"\n'


def test_serving_options_decorator():
    @click.command()
    @serving_options
    def show(ctx, parallel, cache_type, ubatch):
        settings = ServeSettings.from_options(ctx=ctx, parallel=parallel, cache_type=cache_type, ubatch=ubatch)
        click.echo(f"{settings.ctx} {settings.parallel} {settings.cache_type} {settings.ubatch}")

    result = CliRunner().invoke(show, ["--ctx", "512", "--parallel", "2", "--cache-type", "q8_0", "--ubatch", "128"])
    assert result.output.strip() == "512 2 q8_0 128"
    help_text = CliRunner().invoke(show, ["--help"]).output
    assert "QREG_CTX" in help_text
    assert "llama-server's -c" in help_text
    assert "QREG_UBATCH" in help_text


# qreg recommend -----------------------------------------------------------------------------------


def run(args: list[str]):
    return CliRunner().invoke(cli, ["recommend", *args])


def user_files(home: Path) -> list[Path]:
    return sorted(path for path in home.rglob("*") if path.is_file())


@pytest.mark.parametrize(
    "args",
    [
        ["--ram", "2GB"],
        ["--ram", "512MB"],
        ["--ram", "64GB"],
        ["--ram", "16GB", "--backend", "metal"],
        ["--ram", "1GB", "--ctx", "32768"],
        ["--ram", "2GB", "--ctx", "512"],
    ],
)
def test_cli_reference_commands(no_gpu_tools, args):
    text = run(args)
    assert text.exit_code in (0, NothingFitsError.exit_code), text.output
    assert "Traceback" not in text.output
    if text.exit_code == 0:
        assert text.output.startswith("pick: ")
        assert " needs " in text.output
    else:
        assert "no variant fits" in text.output
        assert "try --ctx" in text.output

    data = run([*args, "--json"])
    assert data.exit_code == text.exit_code
    document = json.loads(data.stdout)
    assert len(document["ranked"]) == 30
    if data.exit_code == 0:
        assert document["pick"] is not None
        assert document["estimate"]["terms"]["weights"] > 0
    else:
        assert document["pick"] is None
        assert document["error"]["type"] == "nothing_fits"


def test_cli_64gb_picks_q8_0(no_gpu_tools):
    result = run(["--ram", "64GB", "--json"])
    assert json.loads(result.stdout)["pick"] == "Q8_0"


def test_cli_3gb_default_ctx_picks_q8_0(no_gpu_tools):
    # With 512-token micro-batches, Q8_0 at ctx 8192 needs 2.13 GiB: 0.6 GiB of weights,
    # 0.875 GiB of f16 KV cache, 0.6 GiB of output and compute buffers, 60 MiB runtime.
    data = json.loads(run(["--ram", "3GB", "--json"]).stdout)
    assert data["pick"] == "Q8_0"
    assert data["settings"]["ctx"] == 8192
    assert data["settings"]["ubatch"] == 512
    assert data["estimate"]["total_bytes"] < 2.2 * GIB


def test_cli_2gb_default_ctx_nothing_fits(no_gpu_tools):
    # 2GB is 1.86 GiB. At ctx 8192 the f16 KV cache alone is 896 MiB, so even IQ2_XXS
    # (the smallest eligible, 219 MiB of weights) needs 1.93 GiB with headroom.
    # A q8_0 KV cache (476 MiB) or 256-token micro-batches make room.
    result = run(["--ram", "2GB"])
    assert result.exit_code == NothingFitsError.exit_code
    assert "IQ2_XXS, needs 1.93 GiB of RAM with headroom" in result.output
    assert "--cache-type q8_0 (then Q6_K fits)" in result.output
    assert "--ubatch 256 (then Q5_1 fits)" in result.output

    cache = json.loads(run(["--ram", "2GB", "--cache-type", "q8_0", "--json"]).stdout)
    assert cache["pick"] == "Q6_K"
    assert cache["settings"]["ctx"] == 8192
    ubatch = json.loads(run(["--ram", "2GB", "--ubatch", "256", "--json"]).stdout)
    assert ubatch["pick"] == "Q5_1"


def test_cli_2gb_small_ctx_picks(no_gpu_tools):
    result = run(["--ram", "2GB", "--ctx", "512", "--json"])
    data = json.loads(result.stdout)
    assert data["pick"] == "Q8_0"
    assert data["budget"]["ram_bytes"] == 2 * GB
    assert data["budget"]["ram_source"] == "--ram"


def test_cli_all_lists_every_variant(no_gpu_tools):
    result = run(["--ram", "2GB", "--ctx", "512", "--all"])
    assert result.exit_code == 0
    assert "RANK" in result.output
    assert "TQ1_0" in result.output
    assert "unusable" in result.output


def test_cli_help_says_what_gb_means():
    help_text = " ".join(run(["--help"]).output.split())
    assert "2GB = 2x10^9 bytes" in help_text
    assert "2GiB = 2G = 2x2^30 bytes" in help_text


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--ram", "0"], "invalid --ram '0'"),
        (["--ram", "0.5"], "a number without a unit is bytes: write 0.5GB"),
        (["--ram", "99999999999999999999TB"], "more than 1 EiB"),
        (["--ram", "-1GB"], "cannot be negative"),
        (["--ram", "banana"], "invalid size 'banana'"),
        (["--ram", "2XB"], "unknown unit"),
        (["--vram", "lots", "--backend", "cuda"], "--vram: invalid size 'lots'"),
        (["--ctx", "0"], "invalid --ctx 0"),
        (["--ctx", "32769"], "the model's context is 32768 tokens"),
        (["--parallel", "0"], "invalid --parallel 0"),
        (["--ubatch", "0"], "invalid --ubatch 0"),
        (["--ubatch", "lots"], "'lots' is not a valid integer"),
        (["--backend", "tpu"], "invalid --backend 'tpu'"),
        (["--cache-type", "q5"], "invalid --cache-type 'q5'"),
        (["--backend", "cuda", "--ram", "8GB"], "no free VRAM known"),
    ],
)
def test_cli_bad_input_exit_2(no_gpu_tools, isolated_user_dirs, args, expected):
    before = user_files(isolated_user_dirs)
    result = run(args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("qreg: error: ")
    assert expected in lines[0]
    assert user_files(isolated_user_dirs) == before


def test_cli_bad_size_shows_forms():
    result = run(["--ram", "banana"])
    assert "2GB (10^9 bytes)" in result.output
    assert "2GiB or 2G (2^30 bytes)" in result.output


def test_cli_bad_env_ctx(monkeypatch, no_gpu_tools):
    monkeypatch.setenv("QREG_CTX", "0")
    result = run(["--ram", "8GB"])
    assert result.exit_code == 2
    assert "QREG_CTX" in result.output


def test_cli_bad_input_json_error(no_gpu_tools):
    result = run(["--ram", "banana", "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout.strip().splitlines()[-1])["error"]["type"] == "usage"


def test_cli_nothing_fits_exit_14(no_gpu_tools):
    result = run(["--ram", "512MB"])
    assert result.exit_code == NothingFitsError.exit_code
    assert "no variant fits 488 MiB (--ram)" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_metal_has_no_tq(no_gpu_tools):
    result = run(["--ram", "16GB", "--backend", "metal", "--ctx", "512", "--json", "--allow-low-quality"])
    data = json.loads(result.stdout)
    tq = [item for item in data["ranked"] if item["variant"].startswith("TQ")]
    assert all(item["reason"] == "not supported on metal" for item in tq)
    assert data["estimate"]["placement"]["weights"] == "unified"


def test_cli_nothing_fits_one_json_document(no_gpu_tools):
    result = run(["--ram", "512MB", "--json"])
    assert result.exit_code == NothingFitsError.exit_code
    document = json.loads(result.stdout)
    assert document["pick"] is None
    assert document["error"]["type"] == "nothing_fits"
    assert document["error"]["exit_code"] == 14

"""The benchmark scripts' argument handling (their training and measuring run the tested recipes)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from medusa2_gain import parse_variant  # noqa: E402


def test_variant_overrides_keep_commas_inside_brackets():
    name, overrides = parse_variant("lora:medusa2.lora_r=8,medusa2.lora_target_modules=[q_proj,v_proj],train.lr=1e-4")
    assert name == "lora"
    assert overrides == ["medusa2.lora_r=8", "medusa2.lora_target_modules=[q_proj,v_proj]", "train.lr=1e-4"]
    assert parse_variant("recipe:") == ("recipe", [])


@pytest.mark.parametrize("bad", ["no_colon", ":x=1"])
def test_variant_without_a_name_is_refused(bad):
    with pytest.raises(SystemExit, match="NAME:override"):
        parse_variant(bad)


def test_gain_report_table_and_plot(tmp_path):
    from medusa2_gain import held_out_table, plot, table

    def arm(tau, quality=None):
        backbone = {"top1_agreement": 0.96, "kl_to_original": 0.01, "ppl": 1.7} if quality else None
        return {"heads": "h", "head_top1": [0.2, 0.1], "tau": tau, "speedup": 0.7, "identical": "8/8",
                "quality": quality, "held_out": {"steps": 4, "time_s": 12.0, "head_top1": [0.25, 0.125],
                                                 "backbone": backbone}}

    quality = {"teacher_forced_agreement": 0.95, "perplexity_original": 1.6, "perplexity_tuned": 1.7}
    report = {"data": "d.jsonl", "stage1_steps": 10, "stage2_steps": 4, "tree": "t", "questions": 2,
              "arms": {"medusa1_14": arm(1.5), "medusa2_x": arm(1.7, quality)}}
    text = table(report)
    assert "| medusa1_14 | 0.200 | 0.100 | nan | nan | 1.50 |" in text
    assert "| medusa2_x |" in text and "0.9500 | 1.600 -> 1.700" in text
    held = held_out_table(report)
    assert "| medusa1_14 | 0.250 | 0.125 | 1 | 0 | unchanged | 12 s |" in held
    assert "| medusa2_x | 0.250 | 0.125 | 0.9600 | 0.0100 | 1.700 | 12 s |" in held
    plot(report, tmp_path / "gain.png")
    assert (tmp_path / "gain.png").read_bytes()[:4] == b"\x89PNG"


def test_an_arm_is_trained_once(tmp_path, monkeypatch):
    import compare_heads

    calls = []
    monkeypatch.setattr(compare_heads.subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw["env"])))
    run_dir = tmp_path / "arm"
    compare_heads.train_unless_saved(["+recipe=medusa1", "logger=wandb"], run_dir, threads=2)
    cmd, env = calls[0]
    assert cmd[-2:] == ["+recipe=medusa1", "logger=wandb"]  # the arm's own overrides come last and win
    assert f"output_dir={run_dir}" in cmd and env["OMP_NUM_THREADS"] == "2"
    (run_dir / "heads").mkdir(parents=True)
    (run_dir / "heads" / "medusa_heads.safetensors").write_bytes(b"")
    compare_heads.train_unless_saved(["+recipe=medusa1"], run_dir)
    assert len(calls) == 1

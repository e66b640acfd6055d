"""transfer models: the curated table, with the published figures and this machine's measured speed."""

from __future__ import annotations

import json

from pipeline.models import CURATED
from pipeline.models.__main__ import main


def test_every_curated_model_is_listed_with_its_figures_and_measured_speed(tmp_path, capsys):
    bench = {"machine": {"cores": 2, "cpu": "Test CPU"}, "weights": "random", "models": {
        "resnet50": {"end_to_end": {"fp32": {"rate": 43.0}, "int8": {"rate": 101.0}}},
        "timm/vit_base_patch16_siglip_224.v2_webli": {
            "end_to_end": {"fp32": {"rate": 7.7}},
            "int8_refused": "... int8 variant reaches only a mean cosine of 0.9840 to fp32 ..."},
    }}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    assert main(["--bench", str(tmp_path / "bench.json")]) == 0
    out = capsys.readouterr().out
    for entry in CURATED:
        assert entry.name in out and entry.license in out
    assert "measured here: fp32 43.0 images/s, int8 101.0 images/s end to end" in out
    assert "int8 refused (mean cosine to fp32 0.9840)" in out
    assert "Food-101 72.3, CIFAR-10 93.6, CIFAR-100 78.3, Oxford Pets 91.5 (linear probe: BYOL" in out
    assert main(["--json", "--bench", str(tmp_path / "none.json")]) == 0
    assert [row["name"] for row in json.loads(capsys.readouterr().out)] == [entry.name for entry in CURATED]

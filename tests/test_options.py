"""Options objects: the declared constraints, checked when an object is made, with the command's messages."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from pipeline.errors import UserError
from pipeline.extract import ExtractOptions
from pipeline.fit import FitOptions, PageOptions
from pipeline.options import AtLeast, EachOneOf, Fraction, NotZero, OneOf, Options, Suffix
from pipeline.serve import ClassifyOptions


@dataclass(frozen=True)
class Example(Options):
    count: int | None = None
    share: float = 0.5
    mode: str = "a"
    names: tuple[str, ...] = ("x",)
    jobs: int = -1
    output: Path | None = None
    models_dir: str = "models"

    constraints: ClassVar = {
        "count": [None, AtLeast(1)], "share": [Fraction()], "mode": [OneOf(("a", "b"))],
        "names": [EachOneOf(("x", "y"), "name")], "jobs": [NotZero()], "output": [None, Suffix((".csv",))],
    }
    flags: ClassVar = {"models_dir": "--models"}


@pytest.mark.parametrize("fields,message", [
    ({"count": 0}, "--count 0 must be at least 1."),
    ({"count": True}, "--count True must be at least 1."),
    ({"share": 1.0}, "--share 1.0 must be at least 0 and below 1."),
    ({"mode": "c"}, "--mode c is not one of a, b."),
    ({"names": ("x", "z")}, "unknown name 'z' in --names; choose from: x, y."),
    ({"jobs": 0}, "--jobs 0 runs nothing; use a positive number of parallel fits, or -1 for every core."),
    ({"output": Path("p.txt")}, "--output p.txt must end in .csv."),
])
def test_each_constraint_refuses_in_one_sentence_naming_the_option(fields, message):
    with pytest.raises(UserError) as refused:
        Example(**fields)
    assert str(refused.value) == message


def test_none_passes_only_where_declared_and_good_values_pass():
    Example(count=None, output=None)
    Example(count=3, share=0.0, mode="b", names=("y", "x"), jobs=2, output=Path("p.csv"))
    with pytest.raises(UserError, match="--mode None is not one of a, b"):
        Example(mode=None)


def test_a_path_given_as_text_becomes_a_path_and_text_stays_text():
    made = Example(output="p.csv", models_dir="here")
    assert made.output == Path("p.csv") and made.models_dir == "here"
    with pytest.raises(UserError, match="--output p.txt must end in .csv"):
        Example(output="p.txt")


def test_of_takes_an_object_or_fields_by_name_never_both():
    made = Example(count=2)
    assert Example.of(made, {}) is made
    assert Example.of(None, {"count": 2}) == made
    with pytest.raises(TypeError, match="not both"):
        Example.of(made, {"count": 3})
    with pytest.raises(TypeError, match="Example has no field 'cuont'"):
        Example.of(None, {"cuont": 3})


@pytest.mark.parametrize("options,fields,message", [
    (ExtractOptions, {"batch_size": 0}, "--batch-size 0 must be at least 1."),
    (ExtractOptions, {"device": "tpu"}, "--device tpu is not one of auto, cuda, cpu."),
    (ExtractOptions, {"workers": 0}, "--workers 0 must be at least 1."),
    (ExtractOptions, {"precision": "int4"}, "--precision int4 is not one of auto, fp32, fp16, int8."),
    (ExtractOptions, {"calibration_images": 0}, "--calibration-images 0 must be at least 1."),
    (ExtractOptions, {"backend": "dask"}, "--backend dask is not one of local, ray."),
    (ExtractOptions, {"max_pixels": 0}, "--max-pixels 0 must be at least 1."),
    (FitOptions, {"folds": 1}, "--folds 1 must be at least 2."),
    (FitOptions, {"test_size": 1}, "--test-size 1 must be at least 0 and below 1."),
    (FitOptions, {"class_weight": "even"}, "--class-weight even is not one of balanced."),
    (FitOptions, {"joblib_backend": "dask"}, "--joblib-backend dask is not one of loky, ray."),
    (PageOptions, {"thumbnails": -1}, "--thumbnails -1 must be at least 0."),
    (ClassifyOptions, {"top_k": 0}, "--top-k 0 must be at least 1."),
    (ClassifyOptions, {"output": Path("p.txt")}, "--output p.txt must end in .csv or .jsonl."),
])
def test_the_stages_options_declare_what_their_commands_check(options, fields, message):
    with pytest.raises(UserError) as refused:
        options(**fields)
    assert str(refused.value) == message


def test_a_bad_value_on_the_command_line_is_one_line_naming_the_option(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.extract", str(tmp_path), "--max-pixels", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr == "error: --max-pixels 0 must be at least 1.\n"

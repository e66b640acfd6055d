"""Weights: the libraries' pretrained files (offline here), seeded random, and user state dicts, for every family."""

from __future__ import annotations

import pytest
import torch
import torchvision

from pipeline.errors import UserError
from pipeline.models import parse_model_name
from pipeline.models.networks import build_network
from pipeline.models.weights import WeightsRequest, parse_weights, torchvision_cache_file, weights_per_model
from tests.conftest import make_state_dict

RESNET = parse_model_name("resnet50")
VGG = parse_model_name("vgg16")
ATTO = parse_model_name("timm/convnext_atto.d2_in1k")
MOBILENET = parse_model_name("torchvision/mobilenet_v3_small")


def load_trunk(model, request):
    """The headless network and the provenance of its weights."""
    network = build_network(model, request)
    return network.module, network.weights


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty torch hub cache and a proxy on a closed local port, so any download fails at once."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for variable in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(variable, "http://127.0.0.1:9")
    for variable in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(variable, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_parse_weights_names():
    assert parse_weights(RESNET, "imagenet") == WeightsRequest("imagenet", name="IMAGENET1K_V1")
    assert parse_weights(RESNET, "IMAGENET1K_V2") == WeightsRequest("imagenet", name="IMAGENET1K_V2")
    assert parse_weights(RESNET, "random", seed=7) == WeightsRequest("random", seed=7)
    assert parse_weights(RESNET, "pretrained") == WeightsRequest("imagenet", name="IMAGENET1K_V1")
    with pytest.raises(UserError, match="vgg16 has no IMAGENET1K_V2 weights"):
        parse_weights(VGG, "IMAGENET1K_V2")
    with pytest.raises(UserError, match="does not exist"):
        parse_weights(RESNET, "no/such/file.pth")
    with pytest.raises(UserError, match=r"did you mean imagenet\?"):
        parse_weights(RESNET, "imagent")


def test_parse_weights_of_other_families():
    assert parse_weights(ATTO, "pretrained") == WeightsRequest("pretrained")
    assert parse_weights(MOBILENET, "imagenet") == WeightsRequest("pretrained")
    assert parse_weights(MOBILENET, "IMAGENET1K_V1") == WeightsRequest("pretrained", name="IMAGENET1K_V1")
    with pytest.raises(UserError, match="not 'imagenet'; pass --weights pretrained"):
        parse_weights(ATTO, "imagenet")
    with pytest.raises(UserError,
                       match="mobilenet_v3_small has no IMAGENET1K_V9 weights; choose one of: IMAGENET1K_V1"):
        build_network(MOBILENET, parse_weights(MOBILENET, "IMAGENET1K_V9"))


def test_imagenet_offline_names_the_file_to_put_in_the_cache(offline_cache):
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url
    cache_file = torchvision_cache_file(url)
    assert cache_file == offline_cache / "resnet50-0676ba61.pth"
    with pytest.raises(UserError) as raised:
        load_trunk(RESNET, parse_weights(RESNET, "imagenet"))
    message = str(raised.value)
    assert url in message and str(cache_file) in message and "--weights PATH" in message
    assert "--weights random" in message
    assert not cache_file.exists()


def test_torchvision_pretrained_offline_is_one_sentence(offline_cache):
    with pytest.raises(UserError) as raised:
        build_network(MOBILENET, parse_weights(MOBILENET, "pretrained"))
    message = str(raised.value)
    assert "mobilenet_v3_small-047dcff4.pth" in message and "--weights PATH" in message and "\n" not in message


def test_timm_pretrained_offline_names_the_repository_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as raised:
        build_network(ATTO, parse_weights(ATTO, "pretrained"))
    message = str(raised.value)
    assert "timm/convnext_atto.d2_in1k" in message and "model.safetensors" in message
    assert "https://huggingface.co/timm/convnext_atto.d2_in1k" in message and "--weights PATH" in message
    assert "\n" not in message


def test_imagenet_cache_file_with_wrong_hash_is_refused(offline_cache, state_dict_file):
    cache_file = torchvision_cache_file(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.url)
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(state_dict_file("resnet50").read_bytes())
    with pytest.raises(UserError, match="not the official file .* 0676ba61"):
        load_trunk(RESNET, parse_weights(RESNET, "imagenet"))


def test_random_weights_are_seeded_and_recorded():
    first, provenance = load_trunk(RESNET, parse_weights(RESNET, "random", seed=3))
    second, again = load_trunk(RESNET, parse_weights(RESNET, "random", seed=3))
    _, other = load_trunk(RESNET, parse_weights(RESNET, "random", seed=4))
    assert provenance == again and provenance["source"] == "random" and provenance["seed"] == 3
    assert provenance["sha256"] != other["sha256"]
    assert torch.equal(first.conv1.weight, second.conv1.weight)
    assert isinstance(first.fc, torch.nn.Identity) and not first.training


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_file_is_loaded_exactly(state_dict_file, suffix):
    path = state_dict_file("resnet50", suffix=suffix)
    trunk, provenance = load_trunk(RESNET, parse_weights(RESNET, str(path)))
    reference = make_state_dict("resnet50")
    loaded = trunk.state_dict()
    assert all(torch.equal(loaded[k], reference[k]) for k in loaded)
    assert provenance["source"] == "file" and provenance["file"] == str(path)
    assert len(provenance["sha256"]) == 64


def test_wrapped_checkpoint_and_other_head_are_accepted(tmp_path):
    state = make_state_dict("resnet50")
    state["fc.weight"] = torch.zeros(10, 2048)  # fine-tuned on 10 classes: the head is dropped anyway
    state["fc.bias"] = torch.zeros(10)
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, path)
    trunk, _ = load_trunk(RESNET, parse_weights(RESNET, str(path)))
    assert torch.equal(trunk.conv1.weight, state["conv1.weight"])


def test_state_dict_of_another_architecture_names_the_keys(state_dict_file):
    with pytest.raises(UserError, match=r"not a torchvision resnet50 state dict \(missing keys: conv1.weight"):
        load_trunk(RESNET, parse_weights(RESNET, str(state_dict_file("vgg16"))))


def test_wrong_shape_and_unexpected_keys_are_named(tmp_path):
    state = make_state_dict("resnet50")
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(UserError) as raised:
        load_trunk(RESNET, parse_weights(RESNET, str(path)))
    message = str(raised.value)
    assert "unexpected keys: extra.weight" in message
    assert "conv1.weight (64, 3, 3, 3) instead of (64, 3, 7, 7)" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_clear_error(state_dict_file, tmp_path, suffix):
    data = state_dict_file("resnet50", suffix=suffix).read_bytes()
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=f"could not read the weights file {path}"):
        load_trunk(RESNET, parse_weights(RESNET, str(path)))


def test_file_without_tensors_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"lr": 0.1}, path)
    with pytest.raises(UserError, match="holds no state dict of tensors"):
        load_trunk(RESNET, parse_weights(RESNET, str(path)))


def test_vgg16_trunk_ends_at_fc7_after_relu(state_dict_file):
    trunk, _ = load_trunk(VGG, parse_weights(VGG, str(state_dict_file("vgg16"))))
    reference = torchvision.models.vgg16()
    reference.load_state_dict(make_state_dict("vgg16"))
    reference.eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = reference.classifier[:5](torch.flatten(reference.avgpool(reference.features(images)), 1))
        assert torch.allclose(trunk(images), hidden)
    assert (hidden >= 0).all()  # after the ReLU


def test_weights_per_model_default_to_the_export():
    models = ["vgg16", "resnet50"]
    assert weights_per_model(None, models) == {"vgg16": None, "resnet50": None}
    assert weights_per_model("random", models) == {"vgg16": "random", "resnet50": "random"}
    assert weights_per_model(["imagenet", "resnet50=/w.pth"], models) == {"vgg16": "imagenet", "resnet50": "/w.pth"}
    assert weights_per_model(["vgg16=random"], models) == {"vgg16": "random", "resnet50": None}
    assert weights_per_model(["/path/with=sign.pth"], models) == {m: "/path/with=sign.pth" for m in models}
    with pytest.raises(UserError, match="two values for every model"):
        weights_per_model(["random", "imagenet"], models)
    with pytest.raises(UserError, match="gives resnet50 twice"):
        weights_per_model(["resnet50=random", "resnet50=imagenet"], models)
    timm_models = ["timm/convnext_atto.d2_in1k", "resnet50"]
    assert weights_per_model(["timm-convnext_atto-d2_in1k=random"], timm_models) == {
        "timm/convnext_atto.d2_in1k": "random", "resnet50": None}


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_timm_state_dict_file_is_loaded_exactly(tmp_path, suffix):
    import timm

    torch.manual_seed(5)
    reference = timm.create_model("convnext_atto", num_classes=10)  # fine-tuned on 10 classes: the head is dropped
    path = tmp_path / f"atto{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(reference.state_dict(), str(path))
    else:
        torch.save(reference.state_dict(), path)
    trunk, provenance = load_trunk(ATTO, parse_weights(ATTO, str(path)))
    loaded = trunk.state_dict()
    assert all(torch.equal(loaded[k], reference.state_dict()[k]) for k in loaded)
    assert not any(k.startswith("head.fc") for k in loaded)
    assert provenance["source"] == "file" and provenance["license"].startswith("unknown")


def test_timm_state_dict_of_another_architecture_names_the_first_keys(state_dict_file):
    with pytest.raises(UserError, match=r"not a timm convnext_atto state dict \((missing|unexpected) keys: "):
        load_trunk(ATTO, parse_weights(ATTO, str(state_dict_file("resnet50"))))


def test_random_weights_of_every_family_are_seeded():
    for model in (ATTO, MOBILENET):
        first, provenance = load_trunk(model, parse_weights(model, "random", seed=3))
        second, again = load_trunk(model, parse_weights(model, "random", seed=3))
        assert provenance == again and provenance["license"].startswith("none")
        assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))

"""ImageEmbedder and embed_files: the extract path for lists of files, store reuse, scikit-learn conventions."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from pipeline import ImageEmbedder
from pipeline.errors import UserError
from pipeline.extract.run import run_extract
from pipeline.models import ModelRepository
from pipeline.serve.embedder import embed_files, stored_features
from pipeline.store import PIXELS, EmbeddingStore
from tests.images import class_folders


@pytest.fixture(scope="module")
def models_dir(exported):
    return exported("resnet50", 64).onnx_path.parent


@pytest.fixture(scope="module")
def pets(tmp_path_factory, models_dir, state_dict_file):
    """Two classes of generated photos, extracted once into a store."""
    root = class_folders(tmp_path_factory.mktemp("pets"), {"cat": 5, "dog": 5})
    cache = root.parent / "pets.h5"
    weights = str(state_dict_file("resnet50"))  # what the exported test model has, so nothing is exported again
    run_extract(root, models=["resnet50"], cache=cache, models_dir=models_dir, weights=weights, progress=False)
    return root, cache


def test_embeddings_equal_the_stored_ones_from_extract(pets, models_dir):
    root, cache = pets
    stored = EmbeddingStore(cache).load("resnet50")
    paths = [str(root / p) for p in stored.paths]
    fresh = ImageEmbedder("resnet50", models_dir=models_dir, batch_size=3).fit().transform(paths)
    np.testing.assert_allclose(fresh, stored.embeddings, rtol=1e-5, atol=1e-5)
    pixels = ImageEmbedder(PIXELS).fit().transform(paths)
    np.testing.assert_array_equal(pixels, EmbeddingStore(cache).load(PIXELS).embeddings)


def test_stored_rows_are_reused_by_content_hash(pets, models_dir, tmp_path):
    root, cache = pets
    stored = EmbeddingStore(cache).load("resnet50")
    copy = tmp_path / "elsewhere.jpg"  # same bytes under another name: still found by its hash
    copy.write_bytes((root / stored.paths[0]).read_bytes())
    session = ModelRepository(models_dir).load("resnet50").open()
    known = stored_features(cache, "resnet50", session.manifest.onnx_sha256)
    assert len(known) == 10 and stored_features(cache, "resnet50", "another-model") == {}
    results = list(embed_files([copy, root / stored.paths[1]], session, known))
    assert [r.cached for r in results] == [True, True]
    np.testing.assert_array_equal(results[0].features, stored.embeddings[0])
    embedder = ImageEmbedder("resnet50", models_dir=models_dir, cache=cache).fit()
    np.testing.assert_array_equal(embedder.transform([copy])[0], stored.embeddings[0])


def test_bad_files_raise_or_become_nan_rows(pets, models_dir, tmp_path):
    root, _ = pets
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    good = next(root.glob("cat/*.jpg"))
    results = list(embed_files([good, broken, tmp_path / "gone.jpg"],
                               ModelRepository(models_dir).load("resnet50").open()))
    assert [bool(r.error) for r in results] == [False, True, True] and results[0].features.shape == (2048,)
    assert results[2].error == "missing: no such file"
    embedder = ImageEmbedder("resnet50", models_dir=models_dir).fit()
    with pytest.raises(UserError, match=f"cannot embed {broken}: not an image"):
        embedder.transform([good, broken])
    rows = embedder.set_params(on_error="nan").transform(np.array([[str(good)], [str(broken)]]))
    assert np.isfinite(rows[0]).all() and np.isnan(rows[1]).all()


def test_follows_scikit_learn_conventions_and_grid_searches(pets, models_dir):
    root, cache = pets
    embedder = ImageEmbedder("resnet50", models_dir=models_dir, cache=cache)
    assert embedder.get_params()["models_dir"] is models_dir and clone(embedder).get_params() == embedder.get_params()
    with pytest.raises(Exception, match="not fitted"):
        embedder.transform(["x.jpg"])
    assert embedder.fit() is embedder and embedder.embedding_dim_ == 2048 and len(embedder.onnx_sha256_) == 64
    assert (embedder.get_feature_names_out()[:2].tolist() == ["resnet50_0", "resnet50_1"]
            and embedder.n_features_in_ == 1)
    revived = pickle.loads(pickle.dumps(embedder))  # the onnxruntime session is dropped and reopened
    paths = sorted(str(p) for p in root.rglob("*") if p.suffix in (".jpg", ".png"))
    labels = [p.split("/")[-2] if "/sub/" not in p else p.split("/")[-3] for p in paths]
    np.testing.assert_array_equal(revived.transform(paths[:2]), embedder.transform(paths[:2]))
    model = make_pipeline(ImageEmbedder("resnet50", models_dir=models_dir, cache=cache), LogisticRegression())
    search = GridSearchCV(model, {"logisticregression__C": [0.1, 1.0]}, cv=2).fit(paths, labels)
    assert search.predict(paths[:3]).tolist() == search.best_estimator_.predict(paths[:3]).tolist()


def test_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="vgg16 is not exported in .*export it with .*export --model vgg16"):
        ImageEmbedder("vgg16", models_dir=tmp_path).fit()
    with pytest.raises(ValueError, match=r"model='resnet51': unknown model 'resnet51' \(did you mean resnet50"):
        ImageEmbedder("resnet51").fit()
    with pytest.raises(ValueError, match="on_error='skip' must be one of"):
        ImageEmbedder(on_error="skip").fit()
    with pytest.raises(ValueError, match="got the single path 'a.jpg'; pass \\['a.jpg'\\]"):
        ImageEmbedder("pixels").fit().transform("a.jpg")


# scikit-learn's generic checks that apply to a transformer of image paths. The others feed it random numeric
# arrays (and expect them transformed, or rejected as numbers): an ImageEmbedder takes file paths, so those
# checks would measure missing files, not the estimator's contract.
APPLICABLE_CHECKS = (
    "check_no_attributes_set_in_init", "check_get_params_invariance", "check_set_params",
    "check_parameters_default_constructible", "check_estimator_repr", "check_do_not_raise_errors_in_init_or_set_params",
    "check_estimator_cloneable", "check_valid_tag_types", "check_mixin_order", "check_estimator_tags_renamed",
    "check_estimators_unfitted",
)


@pytest.mark.parametrize("check", APPLICABLE_CHECKS)
def test_scikit_learn_checks_that_apply_to_paths_pass(check):
    from sklearn.utils import estimator_checks

    getattr(estimator_checks, check)("ImageEmbedder", ImageEmbedder("pixels"))

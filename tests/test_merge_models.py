"""`slimlm merge-models`: every method against mergekit on tiny random Llama folders, chat vector as the paper
defines it, DARE's randomness, recipe validation and the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from slimlm.checkpoint.hf import load_safetensors, safetensors_files
from slimlm.merge import methods
from slimlm.merge.merge_config import from_mapping, load_merge_recipe
from slimlm.merge.run import run_merge
from slimlm.recipe import RecipeError

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "merge"


@pytest.fixture(scope="module")
def folders(make_model_folder) -> dict[str, Path]:
    """Three tiny Llama folders of one shape: base, a (target / fine-tune A), b (chat / fine-tune B)."""
    return {k: make_model_folder("llama", seed=s, tokenizer=False)[0] for k, s in (("base", 11), ("a", 12), ("b", 13))}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in safetensors_files(folder):
        out.update(load_safetensors(f))
    return out


def slimlm_merge(cfg: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    run_merge(from_mapping(cfg), out, **kw)
    return tensors(out)


def mergekit_merge(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    mk_config = pytest.importorskip("mergekit.config")
    from mergekit.merge import MergeOptions
    from mergekit.merge import run_merge as mk_run

    mk_run(
        mk_config.MergeConfiguration.model_validate(cfg),
        str(out),
        options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0),
    )
    return tensors(out)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def recipe(method: str, f: dict[str, Path], **extra) -> dict:
    """A mergekit-layout recipe over the tiny folders for `method`."""
    a, b, base = str(f["a"]), str(f["b"]), str(f["base"])
    if method == "linear":
        cfg = {
            "models": [
                {"model": a, "parameters": {"weight": 0.3}},
                {"model": b, "parameters": {"weight": 0.5}},
                {"model": base, "parameters": {"weight": 0.2}},
            ],
            "parameters": {"normalize": True},
        }
    elif method == "slerp":
        t = [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": [0.8, 0.3]}, {"value": 0.4}]
        cfg = {"base_model": a, "models": [{"model": a}, {"model": b}], "parameters": {"t": t}}
    else:  # the task-vector family
        p = {
            "task_arithmetic": {},
            "ties": {"density": 0.4},
            "dare_linear": {"density": 0.6},
            "dare_ties": {"density": 0.6},
        }[method]
        cfg = {
            "base_model": base,
            "models": [
                {"model": a, "parameters": {"weight": 0.7, **p}},
                {"model": b, "parameters": {"weight": [0.2, 0.6], **p}},
            ],  # a gradient over layers
            "parameters": {"lambda": 0.9} if method == "task_arithmetic" else {},
        }
    return {"merge_method": method, "dtype": "float32", **cfg, **extra}


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "slerp"])
def test_method_matches_mergekit(method, folders, tmp_path):
    pytest.importorskip("mergekit")
    cfg = recipe(method, folders)
    ours, theirs = slimlm_merge(cfg, tmp_path / "ours"), mergekit_merge(cfg, tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-6
    assert max_diff(ours, tensors(folders["a"])) > 1e-3  # something was merged


def test_chat_vector_equals_mergekit_task_arithmetic(folders, tmp_path):
    """The issue's check: θ_target + (θ_chat − θ_base) computed directly equals mergekit's task_arithmetic run on
    recipes/merge/chat_vector.yaml (paths filled in) within 1e-6, and slimlm's run of the same file too."""
    pytest.importorskip("mergekit")
    cfg = yaml.safe_load((RECIPES / "chat_vector.yaml").read_text())
    cfg["base_model"] = str(folders["base"])
    cfg["models"][0]["model"], cfg["models"][1]["model"] = str(folders["a"]), str(folders["b"])
    target, chat, base = tensors(folders["a"]), tensors(folders["b"]), tensors(folders["base"])
    direct = {k: methods.chat_vector(target[k], chat[k], base[k]) for k in target}
    theirs = mergekit_merge(cfg, tmp_path / "mk")
    ours = slimlm_merge(cfg, tmp_path / "ours")
    assert max_diff(direct, theirs) <= 1e-6
    assert max_diff(ours, theirs) <= 1e-6


def test_chat_vector_skip_embed(folders, tmp_path):
    """The paper's code with --skip_embed keeps the target's embeddings and head: filters with weight 0."""
    pytest.importorskip("mergekit")
    cfg = yaml.safe_load((RECIPES / "chat_vector.yaml").read_text())
    cfg["base_model"] = str(folders["base"])
    cfg["models"][0]["model"], cfg["models"][1]["model"] = str(folders["a"]), str(folders["b"])
    cfg["models"][1]["parameters"]["weight"] = [
        {"filter": "embed_tokens", "value": 0},
        {"filter": "lm_head", "value": 0},
        {"value": 0.5},
    ]
    ours, theirs = slimlm_merge(cfg, tmp_path / "ours"), mergekit_merge(cfg, tmp_path / "mk")
    assert max_diff(ours, theirs) <= 1e-6
    target, chat, base = tensors(folders["a"]), tensors(folders["b"]), tensors(folders["base"])
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert (ours[k] - target[k]).abs().max() <= 1e-6
    k = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(ours[k], methods.chat_vector(target[k], chat[k], base[k], ratio=0.5), atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_mergekit_with_one_seed(method):
    """DARE draws its masks from torch's RNG with one torch.bernoulli per task vector, as mergekit does: with the
    same seed, the same tensors (checked per tensor: a whole-model run draws in mergekit's task order)."""
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(0)
    base = torch.randn(32, 48, generator=g)
    others = [base + 0.1 * torch.randn(32, 48, generator=g) for _ in range(3)]
    weights, densities = [0.5, 0.3, 0.8], [0.3, 0.6, 0.9]
    params = {
        "weight": dict(enumerate(weights, 1)),
        "density": dict(enumerate(densities, 1)),
        "rescale": True,
        "normalize": False,
        "lambda": 1.0,
        "int8_mask": False,
    }
    torch.manual_seed(7)
    theirs = registry.get(method).merge_group(TensorGroup.from_tensors([base, *others], base_index=0), **params)
    torch.manual_seed(7)
    ours = getattr(methods, method)(base, others, weights, densities)
    assert (ours - theirs).abs().max() <= 1e-6


def test_dare_drop_properties():
    """Kept fraction ≈ density; the L1 rescale (mergekit's) keeps |δ|_1 and is ≈ 1/density; density 1 = task
    arithmetic; a seeded generator repeats."""
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(256, 256, generator=g)
    kept = methods.sparsify(delta, 0.3, lambda d, p: methods.bernoulli_mask(d, p, g), rescale=True)
    frac = (kept != 0).float().mean().item()
    assert abs(frac - 0.3) < 0.01
    assert torch.isclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-5)
    scale = (kept[kept != 0] / delta[kept != 0]).unique()
    assert len(scale) == 1 or (scale.max() - scale.min()) < 1e-4
    assert abs(scale[0].item() - 1 / 0.3) < 0.05
    base, others = torch.zeros(8, 8), [torch.randn(8, 8, generator=g) for _ in range(2)]
    assert torch.allclose(
        methods.dare_linear(base, others, [0.4, 0.6], [1.0, 1.0]), methods.task_arithmetic(base, others, [0.4, 0.6])
    )
    runs = [
        methods.dare_ties(base, others, [1, 1], [0.5, 0.5], generator=torch.Generator().manual_seed(3))
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_dare_whole_model_is_seeded(folders, tmp_path):
    cfg = recipe("dare_ties", folders)
    first = slimlm_merge(cfg, tmp_path / "1", seed=5)
    assert max_diff(first, slimlm_merge(cfg, tmp_path / "2", seed=5)) == 0
    assert max_diff(first, slimlm_merge(cfg, tmp_path / "3", seed=6)) > 0


def test_ties_by_hand():
    """Sign election and disjoint mean on a 1-D example worked out on paper."""
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([-3.0, 1.0, 0.5, 0.0])
    out = methods.ties(base, [a, b], [1.0, 1.0], [1.0, 1.0])
    # entry 0: sum -2 -> '-' wins -> only b's -3; entry 1: sum -1 -> a's -2; entry 2: both agree -> mean 0.5
    assert torch.equal(out, torch.tensor([-3.0, -2.0, 0.5, 0.0]))


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    assert torch.allclose(methods.slerp(a, b, 0.0), a, atol=1e-6)
    assert torch.allclose(methods.slerp(a, b, 1.0), b, atol=1e-6)
    for t in (0.25, 0.5):  # unit inputs stay on the sphere, at angle t*θ from a
        mid = methods.slerp(a / a.norm(), b / b.norm(), t)
        theta = torch.acos((a / a.norm() * b / b.norm()).sum())
        assert abs(mid.norm().item() - 1) < 1e-5
        assert abs(torch.acos((mid * a / a.norm()).sum()).item() - t * theta.item()) < 1e-4
    assert torch.allclose(methods.slerp(a, 2 * a, 0.5), 1.5 * a)  # parallel: linear


def test_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="merge_method 'frankenmerge' is not supported"):
        from_mapping({"merge_method": "frankenmerge", "models": [{"model": "x"}]})
    with pytest.raises(RecipeError, match="ties needs 'base_model:'.*need parameters.weight"):
        from_mapping({"merge_method": "ties", "models": [{"model": "x"}]})
    with pytest.raises(RecipeError, match="'slices': layer slices"):
        from_mapping({"merge_method": "linear", "slices": []})
    with pytest.raises(RecipeError, match="unknown parameter 'densty'"):
        from_mapping(
            {
                "merge_method": "ties",
                "base_model": "b",
                "models": [{"model": "x", "parameters": {"weight": 1, "densty": 0.5}}],
            }
        )
    with pytest.raises(RecipeError, match="exactly 1 other model"):
        from_mapping({"merge_method": "slerp", "base_model": "b", "models": ["x", "y"], "parameters": {"t": 0.5}})
    with pytest.raises(RecipeError, match="slerp needs parameters.t"):
        from_mapping({"merge_method": "slerp", "base_model": "b", "models": ["x"]})
    with pytest.raises(RecipeError, match="dtype 'int4' is not supported"):
        from_mapping(
            {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}], "dtype": "int4"}
        )
    bad = tmp_path / "r.yaml"
    bad.write_text("merge_method: [")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_merge_recipe(bad)
    for f in RECIPES.glob("*.yaml"):  # the shipped examples are valid
        load_merge_recipe(f)


def test_incompatible_shapes_refused(folders, make_model_folder, tmp_path):
    wide, _ = make_model_folder("llama", seed=14, tokenizer=False, intermediate_size=96)
    cfg = {
        "merge_method": "task_arithmetic",
        "base_model": str(folders["base"]),
        "models": [{"model": str(wide), "parameters": {"weight": 1.0}}],
    }
    with pytest.raises(ValueError, match=r"mlp.up_proj.weight: shape \[96, 64\]"):
        run_merge(from_mapping(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli(folders, tmp_path, capsys):
    from slimlm.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe("ties", folders)))
    out = tmp_path / "merged"
    assert main(["merge-models", str(path), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert (out / "merge_recipe.yaml").read_text() == path.read_text()
    single = tensors(out)
    assert main(["merge-models", str(path), "--out", str(out)]) == 2  # non-empty, no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["merge-models", str(path), "--out", str(out), "--overwrite", "--shard-size-gb", "0.0001"]) == 0
    assert (out / "model.safetensors.index.json").is_file()
    assert max_diff(tensors(out), single) == 0
    from slimlm.checkpoint import load_model

    load_model(out)  # slimlm loads the sharded merged folder

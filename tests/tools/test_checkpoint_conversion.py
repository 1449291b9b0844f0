"""HF <-> Megatron checkpoint conversion through the files (issue: checkpoint tools).

* Every tiny variation: HF (released layout) -> Megatron -> loaded and re-saved at TP=2 x PP=2 ->
  HF gives every tensor bit-identical and an equal config.json.
* Megatron TP=2 -> TP=1 -> TP=2 re-saves are bit-identical.
* Sharded inputs and outputs (index files), bf16 kept bit-exact, transformers loads the export.
* The logit check catches a right-shaped tensor under the wrong name.
* Clear errors: shapes (tensor and both shapes), unused tensors, model_type, lossy casts,
  a non-empty --save.
"""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch

from tests.dist import run_distributed
from tests.hf_models import VARIATIONS, make_hf_model, save_release_dir

pytestmark = [pytest.mark.slow]


def _tensors(directory):
    from safetensors import safe_open

    from megatron_hybrid.hf.io import safetensors_files

    out = {}
    for name, file in safetensors_files(str(directory)).items():
        with safe_open(file, "pt") as f:
            out[name] = f.get_tensor(name)
    return out


def _hf_dir_like(directory, tensors, like):
    """An HF directory holding ``tensors`` (one safetensors file) and ``like``'s config files."""
    from safetensors.torch import save_file

    directory.mkdir()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        if (like / name).is_file():
            (directory / name).write_text((like / name).read_text())
    return directory


def _resave_worker(rank, src, dst, tp, pp):
    """Load checkpoint ``src`` into a model at (tp, pp) and save it as ``dst`` (every rank)."""
    from megatron_hybrid.checkpoint.reader import DistCheckpointReader
    from megatron_hybrid.checkpoint.storage import (
        load_model_checkpoint,
        model_config_from_checkpoint,
        save_checkpoint,
    )
    from megatron_hybrid.model import OlmoHybridModel

    cfg = model_config_from_checkpoint(src)
    dtype = DistCheckpointReader(src).param_dtype()  # keep bf16 checkpoints bf16
    model = OlmoHybridModel(cfg, cfg.to_transformer_config(
        tp, pp, params_dtype=dtype, perform_initialization=False))
    load_model_checkpoint(src, model)
    save_checkpoint(dst, 0, model, cfg)
    return True


def _import_worker(rank, jobs):
    """import_from_hf for each (hf_dir, save, kwargs) job; returns the warnings raised."""
    import warnings

    from megatron_hybrid.hf.importer import import_from_hf

    caught = []
    for hf_dir, save, kwargs in jobs:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import_from_hf(hf_dir, save, progress=False, **kwargs)
        caught += [str(x.message) for x in w if "lossy" in str(x.message)]
    return caught


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    """Per variation: (source HF dir, its tensors, HF dir exported after a TP2 x PP2 re-save)."""
    from megatron_hybrid.hf.exporter import export_to_hf

    root = tmp_path_factory.mktemp("round_trips")
    cases, jobs = {}, []
    for variation in sorted(VARIATIONS):
        model, _ = make_hf_model(variation, seed=3)
        src = root / f"{variation}_hf"
        # one variation as bf16 with sharded input files (index + 3 shards)
        bf16 = variation == "gqa"
        sd = save_release_dir(model, src, dtype=torch.bfloat16 if bf16 else None,
                              max_shard_bytes=40_000 if bf16 else None)
        cases[variation] = (src, sd)
        jobs.append((str(src), str(root / f"{variation}_mg"),
                     dict(tp=2, pp=2)))
    run_distributed(_import_worker, 1, jobs, timeout=300)
    out = {}
    for variation, (src, _sd) in cases.items():
        run_distributed(_resave_worker, 4, str(root / f"{variation}_mg"),
                        str(root / f"{variation}_tp2pp2"), 2, 2, tp=2, pp=2, timeout=300)
        dst = root / f"{variation}_back"
        export_to_hf(str(root / f"{variation}_tp2pp2"), str(dst), progress=False,
                     max_shard_bytes=60_000 if variation == "base" else 5 * 10 ** 9)
        out[variation] = (src, dst)
    return root, out


@pytest.mark.distributed
@pytest.mark.parametrize("variation", sorted(VARIATIONS))
def test_hf_megatron_tp2pp2_hf_is_bit_identical(round_trips, variation):
    _, cases = round_trips
    src, dst = cases[variation]
    a, b = _tensors(src), _tensors(dst)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name
    assert json.loads((src / "config.json").read_text()) == \
        json.loads((dst / "config.json").read_text())


@pytest.mark.distributed
def test_sharded_export_has_an_index_and_loads_in_transformers(round_trips):
    from megatron_hybrid.hf.validate import transformers_logits
    from tests.hf_models import hf_logits

    _, cases = round_trips
    src, dst = cases["base"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((dst / s).is_file() for s in shards)
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in _tensors(dst).values())
    model, _ = make_hf_model("base", seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2, 11),
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(transformers_logits(str(dst), ids), hf_logits(model, ids))


@pytest.mark.distributed
def test_tp2_tp1_tp2_resaves_are_bit_identical(round_trips):
    from megatron_hybrid.checkpoint.reader import DistCheckpointReader

    root, _ = round_trips
    for variation in ("grouped_values", "gqa"):
        a2 = str(root / f"{variation}_tp2pp2")
        a1, b2 = str(root / f"{variation}_tp1"), str(root / f"{variation}_tp2again")
        run_distributed(_resave_worker, 1, a2, a1, 1, 1, timeout=300)
        run_distributed(_resave_worker, 2, a1, b2, 2, 1, tp=2, timeout=300)
        readers = [DistCheckpointReader(p) for p in (a2, a1, b2)]
        keys = readers[0].model_keys()
        assert keys == readers[1].model_keys() == readers[2].model_keys()
        first = readers[0].read(keys)
        for r in readers[1:]:
            other = r.read(keys)
            for k in keys:
                assert first[k].dtype == other[k].dtype and torch.equal(first[k], other[k]), k


def _compare_worker(rank, load, hf_dir):
    from megatron_hybrid.hf.validate import compare_logits

    return compare_logits(load, hf_dir).max_abs_diff


@pytest.mark.distributed
def test_logit_check_catches_a_right_shaped_tensor_under_the_wrong_name(round_trips, tmp_path):
    root, cases = round_trips
    _, dst = cases["pattern_1to1"]
    good = run_distributed(_compare_worker, 1, str(root / "pattern_1to1_tp2pp2"), str(dst))[0]
    assert good < 1e-4
    sd = _tensors(dst)
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    sd[q], sd[k] = sd[k], sd[q]
    bad_dir = _hf_dir_like(tmp_path / "swapped", sd, dst)
    bad = run_distributed(_compare_worker, 1, str(root / "pattern_1to1_tp2pp2"), str(bad_dir))[0]
    print(f"[conversion] max |dlogits|: correct {good:.2e}, q/k swapped {bad:.2e}")
    assert bad > 1e3 * max(good, 1e-7)


def _cli_worker(rank, tool, argv):
    """Run a converter's main() (``tool``: its module) in this process; return (status, stderr text)."""
    import importlib
    import warnings

    mod = importlib.import_module(tool)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status = mod.main(argv)
    return status, err.getvalue() + "".join(f"warning: {w.message}\n" for w in caught)


TO_MG = "megatron_hybrid.hf.import_cli"  # tools/convert_hf_to_megatron.py's main
TO_HF = "megatron_hybrid.hf.export_cli"  # tools/convert_megatron_to_hf.py's main


@pytest.mark.distributed
def test_converter_errors_name_the_problem(tmp_path):
    model, _ = make_hf_model("base")
    good = tmp_path / "good"
    save_release_dir(model, good)
    # a tensor of the wrong shape: named with both shapes
    sd = _tensors(good)
    sd["model.layers.0.linear_attn.o_norm.weight"] = torch.ones(8)
    misshaped = _hf_dir_like(tmp_path / "misshaped", sd, good)
    # an unused extra tensor
    sd = _tensors(good)
    sd["model.layers.0.linear_attn.extra.weight"] = torch.ones(2)
    extra = _hf_dir_like(tmp_path / "extra", sd, good)
    # another model type
    other = tmp_path / "other"
    other.mkdir()
    cfg = json.loads((good / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "olmo3"}))
    # a truncated safetensors file: one line naming the file, not safetensors' bare error
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:500])
    (truncated / "config.json").write_text((good / "config.json").read_text())
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("x")
    cases = [
        ([str(truncated)], f"{truncated / 'model.safetensors'}: cannot read safetensors file"),
        ([str(misshaped)], "'model.layers.0.linear_attn.o_norm.weight' has shape (8,); the "
                           "config expects (32,)"),
        ([str(extra)], "model.layers.0.linear_attn.extra.weight"),
        ([str(other)], "model_type is 'olmo3'; expected 'olmo_hybrid'"),
    ]
    for i, (argv, expected) in enumerate(cases):
        status, err = run_distributed(_cli_worker, 1, TO_MG, ["--hf-path", *argv, "--save",
                                      str(tmp_path / f"out{i}"), "--no-progress"])[0]
        assert status == 1 and expected in err, (expected, err)
        assert not (tmp_path / f"out{i}").exists()
    status, err = run_distributed(_cli_worker, 1, TO_MG, [
        "--hf-path", str(good), "--save", str(tmp_path / "bf16"), "--dtype", "bf16",
        "--no-progress"])[0]
    assert status == 0 and "lossy" in err, err
    status, err = run_distributed(_cli_worker, 1, TO_HF, [
        "--load", str(tmp_path / "bf16"), "--save", str(tmp_path / "nonempty"),
        "--no-progress"])[0]
    assert status == 1 and "exists and is not empty" in err, err
    status, err = run_distributed(_cli_worker, 1, TO_HF, [
        "--load", str(tmp_path / "bf16"), "--save", str(tmp_path / "hf32"), "--dtype", "fp32",
        "--skip-validation", "--no-progress"])[0]
    assert status == 0 and "lossy" not in err, err
    status, err = run_distributed(_cli_worker, 1, TO_HF, [
        "--load", str(tmp_path / "missing"), "--save", str(tmp_path / "hfx"),
        "--no-progress"])[0]
    assert status == 1 and "latest_checkpointed_iteration.txt not found" in err, err


def _default_save_worker(rank, hf_dir, ckpt, out):
    from megatron_hybrid.hf.exporter import export_to_hf
    from megatron_hybrid.hf.importer import import_from_hf

    import_from_hf(hf_dir, ckpt, tp=2, progress=False)
    export_to_hf(ckpt, out, progress=False)
    return True


@pytest.mark.distributed
def test_transformers_default_save_imports_and_exports_the_release_layout(tmp_path):
    """transformers' default save_pretrained renames norms (attention_layer_norm, ...) and splits
    the fused conv into equal chunks (docs/model.md §6 traps 2-3); the export is the released layout."""
    from megatron_hybrid.hf.mapping import config_from_hf
    from tests.hf_models import release_state_dict

    model, hcfg = make_hf_model("base", seed=5)  # key dim 64 != value dim 128: unequal chunks
    model.save_pretrained(str(tmp_path / "default"))
    names = set(_tensors(tmp_path / "default"))
    assert any("attention_layer_norm" in n for n in names)  # the aliases really are there
    run_distributed(_default_save_worker, 1, str(tmp_path / "default"), str(tmp_path / "mg"),
                    str(tmp_path / "out"))
    expected = release_state_dict(model.state_dict(), config_from_hf(hcfg.to_dict()))
    got = _tensors(tmp_path / "out")
    assert sorted(got) == sorted(expected)
    for name, t in expected.items():
        assert torch.equal(got[name], t), name

"""The byte-range copy of a standard export (mol.export.shards: raw tensors copied inside the kernel, back-to-back
tensors as one range) writes exactly the bytes of the tensor path (every tensor read in chunks and written);
the fallbacks where the kernel copy is missing do too; cast and in-memory tensors still go through the tensor
path; and the early copy (mol.export.early: started before the plan) gives the same folder, or nothing at all
where the export fails."""

import errno
import hashlib
import os

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import mol
import mol.export.early as early
import mol.export.shards as shards
from mol.errors import CheckpointError
from mol.export import export
from mol.sources import read_safetensors_header
from tests.tiny_models import config_for


def tiny_llama(folder, tied=False, shard=None, dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    cfg = config_for(
        "llama",
        64,
        6,
        vocab_size=320,
        intermediate_size=96,
        max_position_embeddings=128,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(str(folder), max_shard_size=shard or "10GB")
    return folder


def frankenmerge(src):
    return mol.Recipe.from_dict({"name": "franken", "models": {"m": str(src)}, "slots": ["m:0-3", "m:2-5"]})


def digests(folder):
    """sha256 of every weights file and the index, by name."""
    names = [
        p for p in sorted(folder.iterdir()) if p.suffix == ".safetensors" or p.name.endswith("index.json")
    ]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names}


def source_tensors(folder):
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def exported_tensors(folder):
    return source_tensors(folder)


def expected(src_tensors, dtype=None):
    """The frankenmerge's tensors as they should be: slots m:0-3, m:2-5 renumbered 0..7."""
    layers = [0, 1, 2, 3, 2, 3, 4, 5]
    out = {}
    for name, t in src_tensors.items():
        if name.startswith("model.layers."):
            continue
        out[name] = t
    for i, j in enumerate(layers):
        prefix = f"model.layers.{j}."
        for name, t in src_tensors.items():
            if name.startswith(prefix):
                out[f"model.layers.{i}." + name[len(prefix) :]] = t
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def tensor_path(monkeypatch):
    """Every tensor through the chunked read-and-write path, as before the byte-range copy."""
    monkeypatch.setattr(shards, "_is_raw_copy", lambda e: False)


@pytest.fixture(params=["untied", "tied", "sharded-source"])
def source(request, tmp_path):
    kind = request.param
    return tiny_llama(
        tmp_path / kind, tied=kind == "tied", shard="60KB" if kind == "sharded-source" else None
    )


@pytest.mark.parametrize("shard_size", ["5GB", "150KB"])
def test_byte_copy_equals_tensor_path(source, tmp_path, monkeypatch, shard_size):
    if source.name == "sharded-source":
        assert len(list(source.glob("*.safetensors"))) > 2  # layers really span several files
    copied = export(frankenmerge(source), tmp_path / "copied", max_shard_size=shard_size)
    ranges = []
    real = shards.SourceReader.copy_range
    monkeypatch.setattr(
        shards.SourceReader, "copy_range", lambda self, *a: ranges.append(a[2]) or real(self, *a)
    )
    export(frankenmerge(source), tmp_path / "copied-again", max_shard_size=shard_size)
    n_tensors = sum(s["tensors"] for s in copied.shards)
    assert ranges and len(ranges) < n_tensors  # copied as ranges, back-to-back tensors merged
    tensor_path(monkeypatch)
    chunked = export(frankenmerge(source), tmp_path / "chunked", max_shard_size=shard_size)
    assert copied.shards == chunked.shards
    assert digests(tmp_path / "copied") == digests(tmp_path / "chunked") == digests(tmp_path / "copied-again")
    if shard_size == "150KB":
        assert len(copied.shards) > 1
    # and they are the right tensors, byte for byte, and load as the source's own architecture
    got, want = exported_tensors(tmp_path / "copied"), expected(source_tensors(source))
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "copied"))
    assert model.config.num_hidden_layers == 8
    assert model.config.tie_word_embeddings == (source.name == "tied")


@pytest.mark.parametrize("missing", [("copy_file_range",), ("copy_file_range", "sendfile")])
def test_fallbacks_write_the_same_bytes(tmp_path, monkeypatch, missing):
    src = tiny_llama(tmp_path / "src")
    export(frankenmerge(src), tmp_path / "kernel")
    calls = []

    def unsupported(name):
        def fail(*a, **k):
            calls.append(name)
            raise OSError(errno.EXDEV if name == "copy_file_range" else errno.EINVAL, "not here")

        return fail

    for name in missing:
        if hasattr(os, name):
            monkeypatch.setattr(os, name, unsupported(name))
    export(frankenmerge(src), tmp_path / "fallback")
    assert digests(tmp_path / "kernel") == digests(tmp_path / "fallback")
    # each missing way was tried, and copy_file_range once only, not again for the rest of the export (shutil
    # copies the side files with sendfile itself, so that one is not counted)
    assert sorted(set(calls)) == sorted(n for n in missing if hasattr(os, n))
    assert calls.count("copy_file_range") == (1 if hasattr(os, "copy_file_range") else 0)


def test_a_real_copy_error_is_not_a_fallback(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "src")

    def eio(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", eio, raising=False)
    monkeypatch.setattr(shards.SourceReader, "__init__", _reader_init_with("copy_file_range"))
    with pytest.raises(CheckpointError, match="cannot be copied"):
        export(frankenmerge(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _reader_init_with(way):
    real = shards.SourceReader.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        self._copy = way

    return init


def test_a_cast_goes_through_the_tensor_path(tmp_path, monkeypatch):
    src = tiny_llama(tmp_path / "src")
    ranges = []
    real = shards.SourceReader.copy_range
    monkeypatch.setattr(
        shards.SourceReader, "copy_range", lambda self, *a: ranges.append(a) or real(self, *a)
    )
    export(frankenmerge(src), tmp_path / "f16", dtype="float16")
    assert ranges == []  # nothing is a byte range of the bfloat16 source
    got, want = exported_tensors(tmp_path / "f16"), expected(source_tensors(src), torch.float16)
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == torch.float16 and torch.equal(got[k], want[k]), k


def test_mixed_entries_copy_cast_and_in_memory(tmp_path):
    """Raw ranges, a cast tensor and an in-memory tensor (a trained head) in one shard, in that order."""
    src = tiny_llama(tmp_path / "src", dtype=torch.float32)
    headers = {}
    for p in sorted(src.glob("*.safetensors")):
        headers.update(read_safetensors_header(p))
    names = sorted(headers)
    head = torch.randn(320, 64)
    entries = [shards.entry_from_file(n, headers[n]) for n in names[:5]]
    entries.append(shards.entry_from_file("cast." + names[5], headers[names[5]], torch.bfloat16))
    entries += [shards.entry_from_file(n, headers[n]) for n in names[6:9]]
    entries.append(shards.entry_from_tensor("trained.head.weight", head, torch.float32))
    out = tmp_path / "out"
    out.mkdir()
    shards.write_shards(out, entries)
    src_t, got = source_tensors(src), exported_tensors(out)
    assert list(got) == [e.name for e in entries] or set(got) == {e.name for e in entries}
    for n in names[:5] + names[6:9]:
        assert torch.equal(got[n], src_t[n])
    assert got["cast." + names[5]].dtype == torch.bfloat16
    assert torch.equal(got["cast." + names[5]], src_t[names[5]].to(torch.bfloat16))
    assert torch.equal(got["trained.head.weight"], head)


def test_copy_range_past_the_end_of_a_file_fails(tmp_path):
    f = tmp_path / "short.safetensors"
    f.write_bytes(b"x" * 1000)
    reader = shards.SourceReader()
    with open(tmp_path / "out", "wb", buffering=0) as out:
        with pytest.raises(CheckpointError, match="truncated"):
            reader.copy_range(f, 500, 1000, out.fileno(), "'short': tensor 't'")
    reader.close()


# ---- the early copy ----------------------------------------------------------------------------------------------
@pytest.fixture
def early_always(monkeypatch):
    monkeypatch.setattr(early, "MIN_BYTES", 0)
    taken = []
    real = early.EarlyCopy.take
    monkeypatch.setattr(early.EarlyCopy, "take", lambda self, *a: taken.append(r := real(self, *a)) or r)
    return taken


def test_early_copy_is_taken_and_equals_the_plain_export(source, tmp_path, early_always):
    export(frankenmerge(source), tmp_path / "early", max_shard_size="150KB")
    assert early_always and early_always[0] is not None  # the early shards were used
    early.MIN_BYTES = 2**62
    export(frankenmerge(source), tmp_path / "plain", max_shard_size="150KB")
    assert len(early_always) == 1  # no early copy below MIN_BYTES
    assert digests(tmp_path / "early") == digests(tmp_path / "plain")
    assert not [p for p in tmp_path.iterdir() if ".early-" in p.name or ".partial-" in p.name]


def test_early_copy_not_made_where_entries_change(tmp_path, early_always, monkeypatch):
    """A trained head, a cast, another model's layers: no early copy, or one that is discarded."""
    src = tiny_llama(tmp_path / "src")
    export(frankenmerge(src), tmp_path / "f16", dtype="float16")
    assert early_always == []  # a cast is not a byte copy: never started
    import mol.export.standard as standard

    real = standard.standard_entries

    def renamed(*a, **k):  # the plan's entries differ from the early ones: those are discarded
        entries = real(*a, **k)
        if k or len(a) > 2:  # the export's own call (with the parts)
            return list(reversed(entries))
        return entries

    monkeypatch.setattr(standard, "standard_entries", renamed)
    export(frankenmerge(src), tmp_path / "reversed")
    assert early_always == [None]
    assert not [p for p in tmp_path.iterdir() if ".early-" in p.name]
    got = exported_tensors(tmp_path / "reversed")
    want = expected(source_tensors(src))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_early_copy_leaves_nothing_when_the_plan_fails(tmp_path, early_always):
    import json

    src = tiny_llama(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "hidden_size": 96}))  # the config lies
    with pytest.raises(CheckpointError):
        export(frankenmerge(src), tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_cli_exports_in_a_fresh_process_both_formats(tmp_path):
    """`mol export` imports only its own command's modules; the MoL format still registers its auto classes, so
    the folder check (from_pretrained without remote code) passes in a process that imported nothing else."""
    import subprocess
    import sys

    src = tiny_llama(tmp_path / "src")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(frankenmerge(src).to_yaml())
    for fmt in ("standard", "mol"):
        proc = subprocess.run(
            [sys.executable, "-m", "mol.cli", "export", str(recipe), str(tmp_path / fmt), "--format", fmt],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (tmp_path / fmt / "config.json").is_file()
    assert digests(tmp_path / "standard") == digests(export(frankenmerge(src), tmp_path / "in-process").path)

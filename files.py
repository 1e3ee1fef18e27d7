"""
Reading and writing, so that nothing else needs to: checkpoints (a Hugging Face BERT directory; a pruned one with
its scores), safetensors read and written by hand, files written whole or not at all, downloads and the hub's
cache, the caches of this project, and the log. Nothing here is part of the method; skip it on a first read.

Imports bert.py (the model and its tensor names) and blockprune.py (a pruned checkpoint's scores and config).
"""
import fcntl
import hashlib
import http.client
import io
import json
import math
import os
import shutil
import struct
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import torch

import blockprune as bp
from bert import BertConfig, BertForQuestionAnswering, hf_state_dict, load_hf_state_dict

DATA_DIR = Path(__file__).resolve().parent / "data"


def log(msg):
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process speaks for all
        print(msg, file=sys.stderr, flush=True)


# ---- checkpoints: config.json, model.safetensors (Hugging Face names), vocab.txt --------------------------------

def load_pretrained(name_or_dir, build=BertForQuestionAnswering, cache_dir=None):
    """A model built by build(config) (a class built on bert.Bert, or a function) with the weights of a Hugging Face
    BERT checkpoint or one of ours, from a directory or a hub name."""
    d = resolve_checkpoint(name_or_dir, cache_dir)
    config_path = d / "config.json"
    try:  # a list, strings or negative sizes surface as TypeError, AttributeError or RuntimeError
        model = build(BertConfig.from_dict(json.loads(config_path.read_text())))
    except (OSError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise ValueError(f"{config_path}: not a usable BERT config ({e})") from None
    weights = d / "model.safetensors"
    if weights.exists():
        state = read_safetensors(weights)
    else:
        weights = d / "pytorch_model.bin"
        if not weights.exists():
            raise FileNotFoundError(f"{d}: no weights (expected model.safetensors or pytorch_model.bin)")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several kinds, some a page long that advise weights_only=False
            raise ValueError(f"{weights}: not a readable PyTorch checkpoint (torch.load: {type(e).__name__}); "
                             f"cut off, or more than tensors in it?") from None
    if head := load_hf_state_dict(model, state, source=str(weights)):
        log(f"{weights}: no {', '.join(head)} in the checkpoint; the task's head starts at random")
    return model


# An older checkpoint's files that would lie beside new weights if left: pickled weights, and a pruned model's scores,
# which would make a plain one load as pruned. Whoever writes a checkpoint removes those the new one lacks.
STALE = ("pytorch_model.bin", "scores.safetensors", "prune_config.json")


def checkpoint_files(model, vocab_file=None):
    """{file name: bytes} of a checkpoint: config.json, model.safetensors (Hugging Face names), vocab.txt; a pruned
    model (blockprune.MaskedBert) adds its scores.safetensors and prune_config.json."""
    if isinstance(model, bp.MaskedBert):
        return {**checkpoint_files(model.model, vocab_file),
                "scores.safetensors": safetensors_bytes({k: v.detach() for k, v in model.scores.items()}),
                "prune_config.json": json.dumps(asdict(model.config), indent=2).encode()}
    return {"config.json": json.dumps({**model.config.to_dict(), "architectures": [type(model).__name__]},
                                      indent=2).encode(),
            "model.safetensors": safetensors_bytes(hf_state_dict(model)),
            **({"vocab.txt": Path(vocab_file).read_bytes()} if vocab_file is not None else {})}


def save_pretrained(model, out_dir, vocab_file=None, extra_files=None):
    """A model's checkpoint (checkpoint_files, plus extra_files: {name: bytes}) written as one unit (write_files): a
    crash leaves the old checkpoint or the new one, never a mix, nor one beside another's STALE files."""
    write_files(out_dir, {**checkpoint_files(model, vocab_file), **(extra_files or {})}, remove=STALE)


def load_masked(path, build=BertForQuestionAnswering):
    path = Path(path)
    finish_write(path)  # a save that a crash cut short after its commit point
    if not (path / "scores.safetensors").exists():
        raise FileNotFoundError(f"{path}: no scores.safetensors: not a pruned (masked) checkpoint")
    try:
        config = bp.PruneConfig(**json.loads((path / "prune_config.json").read_text(encoding="utf-8")))
    except (ValueError, TypeError) as e:  # not JSON, not an object, a key this version does not know
        raise ValueError(f"{path / 'prune_config.json'}: not a usable prune config ({e})") from None
    masked = bp.MaskedBert(load_pretrained(path, build), config)
    scores = read_safetensors(path / "scores.safetensors")
    # another model's scores, or another --block's, would fail in copy_ below, or list every name
    ours, theirs = ({k: tuple(v.shape) for k, v in s.items()} for s in (masked.scores, scores))
    if bad := sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k)):
        raise ValueError(f"{path / 'scores.safetensors'}: {len(bad)} scores do not fit the model and "
                         f"prune_config.json (e.g. {bad[0]}: {theirs.get(bad[0], 'missing')} in the file, "
                         f"{ours.get(bad[0], 'none')} expected)")
    with torch.no_grad():
        for k, v in scores.items():
            masked.scores[k].copy_(v)
    return masked


# ---- safetensors without the package: 8-byte header length, JSON header, raw little-endian bytes ----------------

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def read_safetensors(path):
    """{name: tensor} from a safetensors file, its header checked whole before any tensor is made: every dtype
    known, every shape a list of sizes, every tensor's bytes inside the file and as many as its shape and dtype
    need, and the tensors one after another with no overlap and no gap, as the format requires. A file that breaks
    any of it is refused, naming the tensor, rather than read as garbage."""
    path = Path(path)
    data = path.read_bytes()

    def corrupt(why):
        return ValueError(f"{path}: corrupt or truncated safetensors file ({why})")
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + n > len(data):  # else a cut-off header that is still valid JSON ('{}') reads as empty
        raise corrupt(f"the header's length {n} runs past the end of the file, {len(data)} bytes")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:  # not JSON, not UTF-8
        raise corrupt(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    size, spans = len(data) - 8 - n, []  # the data's bytes; (start, end, name) of each tensor
    for name, t in header.items():
        if name == "__metadata__":
            continue
        t = t if isinstance(t, dict) else {}
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if dtype not in _DTYPES:
            raise corrupt(f"tensor {name}: dtype {dtype!r}, expected one of {', '.join(_DTYPES)}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise corrupt(f"tensor {name}: shape {shape!r}, expected a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= size):
            raise corrupt(f"tensor {name}: data_offsets {offsets!r}, expected [start, end] within the {size} bytes "
                          "of data")
        need = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != need:
            raise corrupt(f"tensor {name}: {offsets[1] - offsets[0]} bytes, its shape {shape} of {dtype} needs {need}")
        spans.append((*offsets, name))
    end = 0
    for start, stop, name in sorted(spans):
        if start != end:
            raise corrupt(f"tensor {name} starts at byte {start} of the data, the one before it ends at {end}: "
                          "tensors overlap or leave a gap")
        end = stop
    if end != size:
        raise corrupt(f"the tensors end at byte {end} of the data, the file holds {size}")
    base = 8 + n
    return {name: torch.frombuffer(bytearray(data[base + start:base + stop]), dtype=_DTYPES[header[name]["dtype"]])
            .reshape(header[name]["shape"]) if stop > start else
            torch.empty(header[name]["shape"], dtype=_DTYPES[header[name]["dtype"]]) for start, stop, name in spans}


def write_safetensors(path, tensors):
    atomic_write(path, safetensors_bytes(tensors))


def safetensors_bytes(tensors):
    names = {v: k for k, v in _DTYPES.items()}
    # as the safetensors package writes it: transformers 4.x reads metadata.get("format") and fails without it
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


# ---- files written whole: a crash leaves the old one or the new one ----------------------------------------------

def atomic_write(path, data):
    """Write bytes to a temporary file beside path and rename it over path: a crash leaves the old
    file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk, no permission: name the file meant, not the temporary one
        raise OSError(f"{path}: cannot write it ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def remove_leftovers(d):
    """Delete the temporary files (.NAME.tmpPID) that atomic_write left in d when its process was killed; a live
    process's are its own."""
    for tmp in Path(d).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit():
            try:
                os.kill(int(pid), 0)  # raises if no such process; PermissionError: alive, someone else's
            except ProcessLookupError:
                tmp.unlink(missing_ok=True)
            except PermissionError:
                pass


def write_files(d, files, remove=()):
    """Write {file name: bytes} into directory d as one unit, so that a crash (kill -9, a full disk) leaves
    the old files or the new ones, never a config.json beside another model's weights. The files go into
    d/.incoming; renaming it to d/.commit is the commit point; then the names in `remove` that the new files
    lack are deleted and each file is moved into place. finish_write completes a commit that a crash cut
    short; every reader of a checkpoint calls it first (resolve_checkpoint). Other files in d are left alone."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    finish_write(d)
    new = d / ".incoming"
    new.mkdir()
    for name, data in files.items():
        atomic_write(new / name, data)  # fsynced
    atomic_write(new / ".remove", json.dumps([r for r in remove if r not in files]).encode())
    os.replace(new, d / ".commit")
    finish_write(d)


def finish_write(d):
    """Drop a write_files unit that never reached its commit point; complete one that did."""
    d = Path(d)
    if (d / ".incoming").is_dir():
        shutil.rmtree(d / ".incoming")
    commit = d / ".commit"
    if commit.is_dir():
        remove = commit / ".remove"  # written before the commit point, deleted last
        for name in json.loads(remove.read_text()) if remove.exists() else []:
            (d / name).unlink(missing_ok=True)
        for f in commit.iterdir():
            if f != remove:
                os.replace(f, d / f.name)
        remove.unlink(missing_ok=True)
        commit.rmdir()


def digest(data):
    """sha256 of bytes, 16 hex digits."""
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint(path):
    """The digest of a file's bytes, or of what a checkpoint directory holds (its config, weights, scores, vocab):
    what a stage records of its inputs, so that --resume can tell a file changed since."""
    path = Path(path)
    if path.is_file():
        return digest(path.read_bytes())
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "scores.safetensors", "prune_config.json",
             "vocab.txt", "tokenizer_config.json")
    return digest("".join(f"{n} {digest((path / n).read_bytes())} " for n in names if (path / n).exists()).encode())


_HELD = {}  # directory: its open .lock file; the kernel lets go of the lock when the process ends, however it ends


def hold(d):
    """Take directory d for this process until it ends, or refuse (ValueError) naming the process that holds it.
    The lock is the kernel's (flock) on d/.lock: a run that was killed holds nothing, so it never blocks the next."""
    d = Path(d).resolve()
    if d in _HELD:
        return
    d.mkdir(parents=True, exist_ok=True)
    try:
        f = open(d / ".lock", "a+", encoding="utf-8")
    except OSError as e:  # a directory in its place, no permission
        raise OSError(f"{d}: cannot hold it for this run ({d / '.lock'}: {e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{d}: in use by {holder}: wait for it to end, or give another --output_dir") from None
    f.truncate(0)
    f.write(f"process {os.getpid()} (python {' '.join(sys.argv)[:160]}, since {time.strftime('%Y-%m-%d %H:%M:%S')})")
    f.flush()
    _HELD[d] = f


def save_torch(path, obj):
    """torch.save into a file written atomically."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())


def load_cache(path, what, fits=lambda obj: True):
    """A cache file's contents; None (with a line saying why) when it is missing, unreadable or does not fit."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, weights_only=True)
        if fits(obj):
            return obj
        log(f"{path}: cached {what} that do not fit these windows; computing them again")
    except Exception as e:  # a truncated or foreign file: torch raises several kinds
        log(f"{path}: unreadable cache ({e!r}); computing the {what} again")
    return None


# ---- downloads and the hub ---------------------------------------------------------------------------------------

def download(url, path, md5=None):
    """Download url to path (atomically), checking the length and, if given, the md5. A file the server does not
    have raises FileNotFoundError; a server that cannot be reached, ConnectionError (the callers suggest a manual
    download); a download cut off, corrupt or that cannot be written, OSError. Nothing is saved then."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    log(f"downloading {url} -> {path}")
    try:
        try:
            r = urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError as e:  # the server answered: no such file (404), or it refuses
            raise (FileNotFoundError if e.code == 404 else ConnectionError)(
                f"could not download {url}: HTTP {e.code} {e.reason}") from None
        except (OSError, http.client.HTTPException) as e:  # URLError (no route, refused), a timeout
            raise ConnectionError(f"could not download {url}: {getattr(e, 'reason', None) or e}") from None
        got, h = 0, hashlib.md5()
        with r, open(tmp, "wb") as f:
            expected = int(r.headers.get("Content-Length") or -1)
            try:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    h.update(chunk)
                    got += len(chunk)
            except (OSError, http.client.HTTPException) as e:  # reset or timed out mid-way, IncompleteRead, disk full
                raise OSError(f"download of {url} stopped after {got} bytes ({e!r}); nothing saved") from None
        if expected >= 0 and got != expected:
            raise OSError(f"download of {url} cut off after {got} of {expected} bytes; nothing saved")
        if md5 is not None and h.hexdigest() != md5:
            raise OSError(f"download of {url} has md5 {h.hexdigest()}, expected {md5}; nothing saved")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_checkpoint(name_or_dir, cache_dir=None):
    """A local directory as it is; a hub name ('bert-base-uncased') downloaded once into the cache."""
    p = Path(name_or_dir)
    if p.is_dir():
        finish_write(p)  # a checkpoint whose writing a crash cut short after its commit point
        return p
    if p.exists() or str(name_or_dir).startswith((".", "/")) or str(name_or_dir).count("/") > 1:
        raise FileNotFoundError(f"{name_or_dir}: not a checkpoint directory (expected config.json and "
                                f"model.safetensors or pytorch_model.bin in it)")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    d = Path(cache_dir or DATA_DIR / "hub") / str(name_or_dir).replace("/", "--")
    try:
        for f in ("config.json", "vocab.txt"):
            if not (d / f).exists():
                download(f"{endpoint}/{name_or_dir}/resolve/main/{f}", d / f)
        if not ((d / "model.safetensors").exists() or (d / "pytorch_model.bin").exists()):
            try:
                download(f"{endpoint}/{name_or_dir}/resolve/main/model.safetensors", d / "model.safetensors")
            except FileNotFoundError:  # older checkpoints have only the pickled weights
                download(f"{endpoint}/{name_or_dir}/resolve/main/pytorch_model.bin", d / "pytorch_model.bin")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: is '{name_or_dir}' a checkpoint's name on {endpoint}? or pass a checkpoint "
                                "directory") from None
    except ConnectionError as e:
        raise ConnectionError(f"{e}; no network? download the checkpoint elsewhere and pass its directory "
                              f"(config.json, vocab.txt, model.safetensors) instead of '{name_or_dir}'") from None
    return d

"""Where trained models live, and the one way to find and load one. resolve() turns a source (a run directory: its
newest complete step; a model_checkpoints/<step> or checkpoints/<step> directory; an exported or released Hugging Face
folder; a hub id) into the folder holding the model, and load() builds it. Only this file knows the run directory's
layout (docs/pretraining.md): model_checkpoints/<step>/ (model.safetensors, config.yaml, tokenizer.json),
model_checkpoints/latest, and checkpoints/<step>/ (optimizer.pt, train_state.json), each written whole.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import hub
import neobert
from config import REMOVED_KEYS, UserError, build_section, config_to_dict, convert, require
from runtime import write_atomic, write_dir

MODEL_SOURCES = ("a run directory, a model_checkpoints/<step> directory, an exported Hugging Face folder (config.json "
                 "and model.safetensors), or a hub id such as chandar-lab/NeoBERT")
HUB_FILES = ["config.json", "config.yaml", "*.safetensors", "*.safetensors.index.json", "tokenizer*",
             "special_tokens_map.json", "vocab.txt", "modules.json", "1_Pooling/config.json"]
WEIGHTS, CONFIGS = ("model.safetensors", "model.safetensors.index.json"), ("config.yaml", "config.json")

# -----------------------------------------------------------------------------
# the run directory: steps, saving, what a run resumes from


def steps(folder: Path) -> set:
    return {int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()} if folder.is_dir() else set()


def list_checkpoints(run_dir) -> list[int]:
    """Steps with a complete resume checkpoint (in both checkpoints/ and model_checkpoints/), oldest first."""
    return sorted(steps(Path(run_dir) / "checkpoints") & steps(Path(run_dir) / "model_checkpoints"))


def prepare_run_dir(run_dir: Path) -> None:
    """Make trainer.output_dir (a clear error when it cannot be written) and remove what a save killed half-way left
    behind (never picked by resume)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"trainer.output_dir {run_dir} cannot be written ({e.strerror or e}); choose another "
                        "directory") from None
    for stale in [*run_dir.glob("*checkpoints/*.tmp-*"), *run_dir.glob("*checkpoints/*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)


def save_model_dir(path: Path, model, full_config, tokenizer, after_write=None) -> None:
    """A model folder as load() reads it (model.safetensors with plain keys, config.yaml, tokenizer.json), whole or
    not at all. full_config: a config or a plain dict; after_write(d): runs before the rename (tests)."""
    def write(d: Path):
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        plain = full_config if isinstance(full_config, dict) else config_to_dict(full_config)
        (d / "config.yaml").write_text(yaml.safe_dump(plain, sort_keys=False))
        tokenizer.save(str(d / "tokenizer.json"))
        if after_write is not None:
            after_write(d)

    write_dir(path, write)


def save(run_dir: Path, step: int, model, optimizer, cfg, tokenizer, train_state: dict, keep: Optional[int] = None,
         after_model=None) -> None:
    """A training checkpoint: the model folder, then the resume state, then `latest`; the oldest beyond the newest
    `keep` are removed. Called on rank 0 with the raw (uncompiled, unwrapped) model."""
    def write_state(d: Path):
        torch.save(optimizer.state_dict(), d / "optimizer.pt")
        (d / "train_state.json").write_text(json.dumps(train_state))

    save_model_dir(run_dir / "model_checkpoints" / str(step), model, cfg, tokenizer, after_write=after_model)
    write_dir(run_dir / "checkpoints" / str(step), write_state)
    write_atomic(run_dir / "model_checkpoints" / "latest", f"{step}\n")
    for old in list_checkpoints(run_dir)[:-keep] if keep else []:
        shutil.rmtree(run_dir / "checkpoints" / str(old), ignore_errors=True)
        shutil.rmtree(run_dir / "model_checkpoints" / str(old), ignore_errors=True)


def find_resume(resume, run_dir: Path) -> Optional[Path]:
    """The checkpoints/<step> dir that trainer.resume_from_checkpoint names for the run in run_dir (None: fresh)."""
    done = list_checkpoints(run_dir)
    if resume is None or resume is False:
        require(not done, f"{run_dir} already holds checkpoints; set trainer.resume_from_checkpoint auto to continue "
                "that run, or choose a new trainer.output_dir")
        return None
    if resume is True or resume in ("latest", "auto"):
        if done:
            return run_dir / "checkpoints" / str(done[-1])
        require(resume == "auto", f"trainer.resume_from_checkpoint={str(resume).lower()} but {run_dir} holds no "
                "complete checkpoint to resume; use auto to start fresh when there is none")
        return None
    p = Path(resume)
    if p.parent.name == "model_checkpoints":  # given the model dir of a step: its resume state sits beside it
        p = p.parent.parent / "checkpoints" / p.name
    if not (p / "train_state.json").is_file() and list_checkpoints(p):  # a run dir: its newest step
        p = p / "checkpoints" / str(list_checkpoints(p)[-1])
    require((p / "train_state.json").is_file() and (p.parent.parent / "model_checkpoints" / p.name).is_dir(),
            f"trainer.resume_from_checkpoint={resume}: not a run directory or a complete checkpoints/<step> directory")
    return p


def read_train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def resume_weights(ckpt: Path, model) -> None:
    """The weights of checkpoints/<step> (they sit in model_checkpoints/<step>) into model, strictly."""
    folder = ckpt.parent.parent / "model_checkpoints" / ckpt.name
    load_state_dict_strict(model, read_safetensors(folder), folder)


def resume_state(ckpt: Path, optimizer) -> dict:
    """The optimizer state of checkpoints/<step> into optimizer (built over parameters already on their device);
    -> its train state (step, tokens, every rank's loader position, ...)."""
    try:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True))
    except (ValueError, RuntimeError, KeyError) as e:
        raise UserError(f"{ckpt / 'optimizer.pt'} does not fit this model/optimizer: {e}") from None
    return read_train_state(ckpt)


def owning_run(folder: Path) -> Optional[Path]:
    """The run directory whose model_checkpoints/<step> `folder` is, or None (an exported or released folder)."""
    return folder.parent.parent if folder.parent.name == "model_checkpoints" and folder.name.isdigit() else None


def home(source: str) -> Path:
    """Where evaluations of a model go by default (glue/, mteb/ inside): the run directory of a run or one of its
    steps, else runs/<the folder's name, or the hub id with _ for />."""
    p = Path(source).expanduser()
    if (p / "model_checkpoints").is_dir():
        return p
    if p.parent.name in ("model_checkpoints", "checkpoints") and p.name.isdigit():
        return p.parent.parent
    return Path("runs") / (p.name if p.exists() else source.strip("/").replace("/", "_"))


def newest_run(runs: Path = Path("runs")) -> Path:
    """The newest complete model checkpoint (by its weights' write time; weights, config and tokenizer, what an export
    needs) among the run directories under `runs`."""
    how = "train one (python train.py CONFIG) or name the run: python export.py --out HF_DIR RUN_DIR"
    require(runs.is_dir(), f"no run directory given and no {runs.resolve()} folder to look in; {how}")
    found = []
    for run in {p.parent for p in runs.glob("**/model_checkpoints")}:
        try:
            folder = newest_step(run / "model_checkpoints")
        except UserError:  # a run that has not saved a complete checkpoint yet
            continue
        if (folder / "tokenizer.json").is_file():
            found.append(((folder / "model.safetensors").stat().st_mtime, str(folder), folder))
    require(found, f"no run directory given and no complete model checkpoint under {runs.resolve()}; {how}")
    return max(found)[2]


# -----------------------------------------------------------------------------
# resolve: a source -> the folder holding the model


def missing_files(folder: Path) -> list:
    return [" or ".join(names) for names in (WEIGHTS, CONFIGS) if not any((folder / n).is_file() for n in names)]


def newest_step(folder: Path) -> Path:
    """model_checkpoints/latest if it names a complete step, else the highest complete step."""
    latest = (folder / "latest").read_text().strip() if (folder / "latest").is_file() else ""
    if latest.isdigit() and not missing_files(folder / latest):
        return folder / latest
    done = [s for s in steps(folder) if not missing_files(folder / str(s))]
    require(done, f"no model checkpoint in {folder}: the run has saved no complete model checkpoint yet "
            f"(model_checkpoints/<step>/ with {WEIGHTS[0]} and {CONFIGS[0]})")
    return folder / str(max(done))


def is_hub_id(source: str) -> bool:
    """owner/name, unless it is a local path (runs/mistyped is a missing run, not a repo)."""
    p = Path(source).expanduser()
    return (source.count("/") == 1 and not p.exists() and not source.startswith((".", "/", "~"))
            and not source.endswith("/") and not p.parent.is_dir())


def resolve(source) -> Path:
    """The folder holding the model that `source` names (see the top of this file); a bad source is a UserError."""
    source = str(source)
    if is_hub_id(source):
        p = Path(hub.snapshot(source, HUB_FILES, what=f"download the model {source}", offline="set HF_HUB_OFFLINE=1 "
                              f"to use the HF cache, or pass a local folder: {MODEL_SOURCES}"))
        require(not missing_files(p), f"hub repo {source} has no {' and no '.join(missing_files(p))}: is it a "
                "NeoBERT model?")
        return p
    p = Path(source).expanduser()
    require(p.exists(), f"{source} is not a model folder: it does not exist; pass {MODEL_SOURCES}")
    if p.parent.name == "checkpoints" and (p.parent.parent / "model_checkpoints" / p.name).is_dir():
        p = p.parent.parent / "model_checkpoints" / p.name  # resume state: its weights sit beside it
    if p.name != "model_checkpoints" and (p / "model_checkpoints").is_dir():
        p = p / "model_checkpoints"  # a run directory
    if p.name == "model_checkpoints":
        return newest_step(p)
    require(not missing_files(p), f"{p} is not a model folder (it has no {' and no '.join(missing_files(p))}); pass "
            f"{MODEL_SOURCES}")
    return p


# -----------------------------------------------------------------------------
# load: a folder -> its model config, weights, tokenizer, pooling and classifier head


def config_from_hf(d: dict, **overrides) -> neobert.NeoBERTConfig:
    """A released (chandar-lab/NeoBERT) or exported config.json; fields this model has no use for are ignored."""
    kwargs = {k: d[k] for k in neobert.NeoBERTConfig.__dataclass_fields__ if k in d}
    if "max_length" in d:  # the released config.json's name for the context length
        kwargs.setdefault("max_position_embeddings", d["max_length"])
    cfg = neobert.NeoBERTConfig(**{**kwargs, **overrides})
    if "dim_head" in d and d["dim_head"] != cfg.head_dim:
        raise ValueError(f"config.json says dim_head={d['dim_head']} but hidden_size/num_attention_heads = "
                         f"{cfg.head_dim}")
    return cfg


@dataclass
class PretrainedInfo:
    path: Path  # the folder the weights came from
    model_config: neobert.NeoBERTConfig
    tokenizer: object  # tokenizers.Tokenizer, or None when the folder has no tokenizer.json
    full_config: dict  # config.yaml (a training checkpoint) or config.json (a Hugging Face folder)
    pooling: str = "mean"  # mean | cls: contrastive.pooling, or an exported folder's 1_Pooling/config.json
    num_labels: Optional[int] = None  # a saved classifier head's label count
    id2label: Optional[dict] = None  # {int: str} of a saved classifier


def read_config(path: Path, model_overrides: dict) -> tuple:
    """(full config dict, NeoBERTConfig, pooling, saved classifier section or {}) of a checkpoint or an HF folder."""
    if (path / "config.yaml").is_file():  # a training checkpoint
        try:
            full = yaml.safe_load((path / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path / 'config.yaml'} is not valid YAML: {' '.join(str(e).split())}") from None
        require(isinstance(full, dict) and isinstance(full.get("model"), dict),
                f"{path / 'config.yaml'} has no model: section; is it a neobert checkpoint?")
        model = {k: v for k, v in full["model"].items() if f"model.{k}" not in REMOVED_KEYS}  # of older runs
        model_config = build_section("model", neobert.NeoBERTConfig, {**model, **model_overrides})
        pooling = convert((full.get("contrastive") or {}).get("pooling", "mean"), Literal["mean", "cls"],
                          f"{path / 'config.yaml'}: contrastive.pooling")
        return full, model_config, pooling, full.get("classifier") or {}
    try:
        full = json.loads((path / "config.json").read_text())
        model_config = config_from_hf(full, **model_overrides)
    except (ValueError, TypeError) as e:
        raise UserError(f"{path / 'config.json'}: {e}") from None
    st_pooling = path / "1_Pooling" / "config.json"  # sentence-transformers' pooling of an exported model
    st = json.loads(st_pooling.read_text()) if st_pooling.is_file() else {}
    saved = {k: full[k] for k in ("id2label", "classifier_dropout") if full.get(k) is not None}
    return full, model_config, "cls" if st.get("pooling_mode_cls_token") else "mean", saved


def read_safetensors(folder: Path) -> dict:
    """model.safetensors, or the shards model.safetensors.index.json names, as one state dict."""
    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        index = folder / "model.safetensors.index.json"
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    except Exception as e:  # truncated, not safetensors, a shard missing
        name = "model.safetensors" if (folder / "model.safetensors").is_file() else "its safetensors shards"
        raise UserError(f"cannot read the weights in {folder / name}: {e}") from None


def load_state_dict_strict(module: torch.nn.Module, state_dict: dict, where) -> None:
    """load_state_dict(strict=True), but a mismatch is a UserError naming the first offending tensor and `where`."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing:
        raise UserError(f"{where}: checkpoint has no tensor {missing[0]!r} ({len(missing)} missing); is it from "
                        "another model?")
    if unexpected:
        raise UserError(f"{where}: checkpoint tensor {unexpected[0]!r} is not in this model ({len(unexpected)} "
                        "unexpected)")
    for k, t in own.items():  # in the model's order: the embedding is named first
        require(tuple(state_dict[k].shape) == tuple(t.shape), f"{where}: checkpoint tensor {k!r} has shape "
                f"{list(state_dict[k].shape)} but the model expects {list(t.shape)}: the checkpoint is from a "
                "different model shape")
    module.load_state_dict(state_dict, strict=True)


def load(source, head: str = "mlm", num_labels: Optional[int] = None, classifier_dropout: Optional[float] = None,
         classifier_init_range: float = 0.02, new_head_if_mismatch: bool = False, **model_overrides):
    """(model, PretrainedInfo) of any source. head: mlm (NeoBERTLMHead), encoder (NeoBERT), classifier
    (NeoBERTForSequenceClassification: a saved head with the same label count is kept; from an MLM checkpoint, or
    with new_head_if_mismatch, a new head initialised with classifier_init_range) or auto (classifier when the
    weights hold one, else mlm). model_overrides replace model config keys (e.g. attn_backend="sdpa"). The model is
    on the CPU in fp32, in train mode."""
    require(head in ("mlm", "encoder", "classifier", "auto"), f"head must be mlm, encoder, classifier or auto, got "
            f"{head!r}")
    path = resolve(source)
    full, model_config, pooling, saved_head = read_config(path, model_overrides)
    sd = read_safetensors(path)
    if not any(k.startswith("model.") for k in sd):  # a bare encoder file
        sd = {"model." + k: v for k, v in sd.items()}
    saved_labels = sd["classifier.weight"].shape[0] if "classifier.weight" in sd else None
    if head == "auto":
        head = "mlm" if saved_labels is None else "classifier"
    id2label = saved_head.get("id2label") if saved_labels else None
    info = PretrainedInfo(path=path, model_config=model_config, tokenizer=read_tokenizer(path), full_config=full,
                          pooling=pooling, num_labels=saved_labels,
                          id2label={int(k): str(v) for k, v in id2label.items()} if id2label else None)
    encoder_sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
    if head == "mlm":
        require("decoder.weight" in sd, f"{path} holds no MLM decoder (decoder.*): load it as an encoder or a "
                "classifier")
        model = target = neobert.NeoBERTLMHead(model_config)
        sd = {k: v for k, v in sd.items() if k.split(".")[0] in ("model", "decoder")}
    elif head == "encoder":
        model = target = neobert.NeoBERT(model_config)
        sd = encoder_sd
    else:
        keep = saved_labels is not None and num_labels in (None, saved_labels)
        require(saved_labels is None or keep or new_head_if_mismatch, f"{path} holds a classifier with {saved_labels}"
                f" labels but num_labels={num_labels} was asked for; leave num_labels out to keep it, or ask for a "
                "new head")
        dropout = classifier_dropout if classifier_dropout is not None else saved_head.get("classifier_dropout", 0.1)
        model = neobert.NeoBERTForSequenceClassification(
            model_config, num_labels=saved_labels if keep else (num_labels or 2), classifier_dropout=float(dropout),
            classifier_init_range=classifier_init_range)
        if keep:  # the whole fine-tuned model
            target, sd = model, {k: v for k, v in sd.items() if k.split(".")[0] in ("model", "dense", "classifier")}
        else:  # the encoder; the head stays as initialised
            target, sd = model.model, encoder_sd
            info.num_labels, info.id2label = None, None
    load_state_dict_strict(target, sd, path)
    return model, info


def read_tokenizer(path: Path):
    """The folder's tokenizer.json, or None when it has none."""
    if not (path / "tokenizer.json").is_file():
        return None
    try:
        return Tokenizer.from_file(str(path / "tokenizer.json"))
    except Exception as e:  # not a tokenizers file, or a damaged one
        raise UserError(f"{path / 'tokenizer.json'} is not a tokenizers tokenizer.json: {e}") from None

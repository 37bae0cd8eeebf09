"""tfds builders (array_record, no TensorFlow needed) for Lumos annotations and eval sets.

Both read local files from the builder's manual dir (nothing is downloaded):
- `lumos_annotations/<task>_<module>_<formulation>`: `lumos_<config>.jsonl` (the released
  file names), validated record by record as in `lumos_jax.data.records`;
- `lumos_eval/<gsm8k|svamp|strategyqa|hotpotqa>`: the reference's eval files
  (`gsm8k_test.jsonl`, `svamp_test.json`, `strategyqa_test.json`, `hotpotqa_dev.json`).

Read them back with `tfds.data_source(name, data_dir=...)` (random access) — the loader
does this for `tfds:` source specs, through a `grain.MapDataset`.
"""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

from lumos_jax.data.records import BadRecordError, read_annotations
from lumos_jax.jsonl import iter_jsonl

TASKS = ("maths", "complex_qa", "web_agent", "multimodal", "unified")
ANNOTATION_CONFIGS = [f"{t}_{m}_{f}" for t in TASKS for m in ("plan", "ground") for f in ("iterative", "onetime")]
EVAL_FILES = {"gsm8k": "gsm8k_test.jsonl", "svamp": "svamp_test.json",
              "strategyqa": "strategyqa_test.json", "hotpotqa": "hotpotqa_dev.json"}


class LumosAnnotations(tfds.core.GeneratorBasedBuilder):
    """Lumos training conversations, one config per released annotation file."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in ANNOTATION_CONFIGS]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Place lumos_<task>_<module>_<formulation>.jsonl files in the manual dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "dataset": tfds.features.Text(), "id": tfds.features.Text(),
            "messages_json": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        path = Path(dl_manager.manual_dir) / f"lumos_{self.builder_config.name}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"lumos_annotations/{self.builder_config.name}: {path} not found")
        return {"train": self._generate_examples(path)}

    def _generate_examples(self, path):
        for n, record in enumerate(read_annotations(path)):
            yield n, {"dataset": str(record.get("dataset", "")), "id": str(record.get("id", n)),
                      "messages_json": json.dumps(record["messages"], ensure_ascii=False)}


def _eval_rows(name: str, path: Path):
    """(question, answer, meta) of each evaluation example, as the reference reads them."""
    if name == "gsm8k":
        for _, row in iter_jsonl(path, error=BadRecordError):
            yield row["question"], row["answer"].split("####")[-1].strip(), {"rationale": row["answer"]}
        return
    rows = json.loads(path.read_text(encoding="utf-8"))
    for row in rows:
        if name == "svamp":
            question = f"{row['Body'].strip()} {row['Question'].strip()}"
            answer = float(row["Answer"])  # exact: '{:g}' would round 22090603 to 2.20906e+07
            answer = str(int(answer)) if answer.is_integer() else repr(answer)
            yield question, answer, {k: row[k] for k in ("ID", "Equation", "Type") if k in row}
        elif name == "strategyqa":
            yield row["question"], "yes" if row["answer"] else "no", {}
        else:
            yield row["question"], str(row["answer"]), {"type": row.get("type", "")}


class LumosEval(tfds.core.GeneratorBasedBuilder):
    """The reference's evaluation sets: GSM8K, SVAMP, StrategyQA, HotpotQA."""

    VERSION = tfds.core.Version("1.0.1")
    RELEASE_NOTES = {"1.0.1": "SVAMP answers written exactly (1.0.0 rounded them to 6 digits)."}
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in EVAL_FILES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Point manual_dir at ../shared/data/eval (the reference's data/eval files)."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(), "question": tfds.features.Text(),
            "answer": tfds.features.Text(), "meta_json": tfds.features.Text()}), disable_shuffling=True)

    def _split_generators(self, dl_manager):
        path = Path(dl_manager.manual_dir) / EVAL_FILES[self.builder_config.name]
        if not path.exists():
            raise FileNotFoundError(f"lumos_eval/{self.builder_config.name}: {path} not found")
        return {"test": self._generate_examples(path)}

    def _generate_examples(self, path):
        for n, (question, answer, meta) in enumerate(_eval_rows(self.builder_config.name, path)):
            yield n, {"id": f"{self.builder_config.name}_{n}", "question": question, "answer": answer,
                      "meta_json": json.dumps(meta, ensure_ascii=False)}


def build(name: str, data_dir: str | Path, manual_dir: str | Path) -> tfds.core.DatasetBuilder:
    """Prepare `name` (e.g. `lumos_eval/gsm8k`) as array_record files under data_dir."""
    builder = tfds.builder(name, data_dir=str(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    builder.download_and_prepare(download_config=config)
    return builder

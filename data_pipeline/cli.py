"""`lumos-jax data convert|build|inspect`.

  convert reference --domain D --input converted.jsonl [...] --out DIR
  convert gsm8k     --input gsm8k_train.jsonl --out DIR
  convert teacher   --domain D --input FILE --endpoint URL --model M --out FILE
  build   NAME      --manual_dir DIR --data_dir DIR        (NAME e.g. lumos_eval/gsm8k)
  inspect [SOURCE ...] --tokenizer PATH [--index N] [--seq_len L] [--no_packing]
Every subcommand takes --gin_file / --gin.X=Y; `inspect` reads gin-bound
`make_train_iterator` settings when sources are not given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_pipeline.teacher import ChatClient, convert_with_teacher, gsm8k_items
from lumos_jax.assets import bundled
from lumos_jax.config import parse_args
from lumos_jax.data.encoding import encode_fast
from lumos_jax.data.gsm8k import convert_file
from lumos_jax.data.loader import make_train_iterator
from lumos_jax.data.records import write_jsonl_atomic
from lumos_jax.data.reference_conversion import convert_domain, convert_rows
from lumos_jax.jsonl import iter_jsonl, read_jsonl
from lumos_jax.tokenization import concat_messages

USAGE = __doc__


def _convert(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax data convert")
    parser.add_argument("kind", choices=["reference", "gsm8k", "teacher"])
    parser.add_argument("--input", action="append", required=True, help="input file (repeatable for reference)")
    parser.add_argument("--out", required=True, help="output dir (reference, gsm8k) or file (teacher)")
    parser.add_argument("--domain", default="maths", help="maths | complex_qa | web_agent (teacher: also maths_prm)")
    parser.add_argument("--endpoint", help="teacher: OpenAI-compatible base URL, e.g. http://host:8000/v1")
    parser.add_argument("--model", help="teacher: model name sent to the endpoint")
    parser.add_argument("--api_key_env", default="OPENAI_API_KEY", help="teacher: env var holding the API key")
    parser.add_argument("--exemplars", help="teacher: converted file with the in-context examples "
                        "(default: the reference's, bundled:demo_data/converted/<domain>.jsonl)")
    parser.add_argument("--max_items", type=int, help="teacher: stop after this many items")
    parser.add_argument("--max_retries", type=int, default=5)
    args = parse_args(parser, argv)
    if args.kind == "reference":
        stats = convert_domain(args.input, args.domain, args.out)
        for name, st in stats.items():
            print(f"{Path(args.out) / name}: {st.written} written, {st.dropped} dropped")
        return 0
    if args.kind == "gsm8k":
        return _convert_gsm8k(args)
    return _convert_teacher(args)


def _convert_gsm8k(args) -> int:
    out = Path(args.out)
    rows, report = convert_file(args.input[0])
    write_jsonl_atomic(out / "gsm8k_converted.jsonl", (json.dumps(r) for r in rows))
    for module in ("plan", "ground"):
        for formulation in ("iterative", "onetime"):
            lines, st = convert_rows(rows, "maths", module, formulation)
            write_jsonl_atomic(out / f"lumos_gsm8k_{module}_{formulation}.jsonl", lines)
            print(f"{out}/lumos_gsm8k_{module}_{formulation}.jsonl: {st.written} written, {st.dropped} dropped")
    summary = {"total": report.total, "converted": report.converted, "executed": report.executed,
               "conversion_rate": report.converted / max(report.total, 1),
               "execution_rate": report.executed / max(report.total, 1),
               "failures": report.failures, "failure_examples_line_numbers": report.examples}
    write_jsonl_atomic(out / "gsm8k_report.json", [json.dumps(summary, indent=1)])
    print(json.dumps(summary))
    return 0


def _convert_teacher(args) -> int:
    if not args.endpoint or not args.model:
        raise ValueError("convert teacher: --endpoint and --model are required")
    path = args.input[0]
    first = next((row for _, row in iter_jsonl(path)), {})
    items = gsm8k_items(path) if "answer" in first and "question" in first else read_jsonl(path)
    for n, item in enumerate(items, 1):
        if "task" not in item or "natural_language_plan" not in item:
            raise ValueError(f"{path}: item {n} needs 'task' and 'natural_language_plan' (or GSM8K rows)")
    domain_file = "maths" if args.domain == "maths_prm" else args.domain
    exemplars_path = args.exemplars or bundled(f"demo_data/converted/{domain_file}.jsonl")
    if not Path(exemplars_path).exists():
        raise FileNotFoundError(f"convert teacher: --exemplars {exemplars_path} not found")
    client = ChatClient(args.endpoint, args.model, api_key=os.environ.get(args.api_key_env),
                        max_retries=args.max_retries)
    report = convert_with_teacher(items, args.domain, args.out, client, read_jsonl(exemplars_path),
                                  max_items=args.max_items)
    print(json.dumps(report._asdict()))
    return 0 if not report.failed else 1


def _build(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax data build")
    parser.add_argument("name", help="lumos_annotations/<task>_<module>_<formulation> or lumos_eval/<set>")
    parser.add_argument("--manual_dir", required=True, help="directory holding the source files")
    parser.add_argument("--data_dir", required=True, help="where the array_record dataset is written")
    args = parse_args(parser, argv)
    from lumos_jax.data.tfds_builders import build  # imports tensorflow_datasets (seconds): `build` only

    builder = build(args.name, args.data_dir, args.manual_dir)
    for split, info in builder.info.splits.items():
        print(f"{args.name} {split}: {info.num_examples} examples in {builder.data_dir}")
    return 0


def _decode_visible(ids, tokenizer) -> str:
    """Decoded text with special tokens (`<s>`, `</s>`) written out."""
    specials = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    out, run = [], []
    for t in list(ids) + [None]:
        if t is None or t in specials:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            if t is not None:
                out.append(tokenizer.id_to_piece(t))
        else:
            run.append(t)
    return "".join(out)


def _marked(ids, labels, tokenizer) -> str:
    """Decoded text; the trained (unmasked) spans are wrapped in ⟦ ⟧."""
    out, start = [], 0
    keep = [int(l) >= 0 for l in labels]
    for i in range(1, len(ids) + 1):
        if i == len(ids) or keep[i] != keep[start]:
            piece = _decode_visible(ids[start:i], tokenizer)
            out.append(f"⟦{piece}⟧" if keep[start] else piece)
            start = i
    return "".join(out)


def _inspect(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lumos-jax data inspect")
    parser.add_argument("sources", nargs="*", help="annotation files or tfds:NAME (default: gin-bound sources)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: gin-bound)")
    parser.add_argument("--index", type=int, default=0, help="which example of the first source to print")
    parser.add_argument("--seq_len", type=int)
    parser.add_argument("--batch_size", type=int)
    parser.add_argument("--no_packing", action="store_true")
    parser.add_argument("--skip_bad_records", action="store_true")
    parser.add_argument("--tfds_data_dir")
    args = parse_args(parser, argv)

    kwargs = {k: v for k, v in dict(sources=args.sources or None, tokenizer=args.tokenizer, seq_len=args.seq_len,
                                    batch_size=args.batch_size, tfds_data_dir=args.tfds_data_dir).items()
              if v is not None}
    if args.no_packing:
        kwargs["packing"] = False
    if args.skip_bad_records:
        kwargs["skip_bad_records"] = True
    try:
        it = make_train_iterator(num_epochs=1, process_index=0, process_count=1, **kwargs)
    except RuntimeError as e:
        if "Required bindings" not in str(e):
            raise
        raise ValueError("inspect: give annotation files and --tokenizer, or bind make_train_iterator.sources "
                         "and .tokenizer in a gin file") from None
    src = it.sources[0]
    if not 0 <= args.index < len(src):
        raise ValueError(f"--index {args.index}: {src.name} has {len(src)} examples")
    record = src[args.index]
    enc = encode_fast(record["messages"], it.tokenizer, it.max_len)
    print(f"== {src.name} #{args.index} (id {record.get('id')}): {len(enc.input_ids)} tokens"
          f"{' (truncated from %d)' % enc.full_length if enc.full_length > it.max_len else ''}; "
          f"trained spans in ⟦ ⟧")
    print(_marked(enc.input_ids.tolist(), enc.labels.tolist(), it.tokenizer))
    lengths = [it.example_length(s, i) for s, source in enumerate(it.sources) for i in range(len(source))]
    full = [len(it.tokenizer.encode(concat_messages(source[i]["messages"], it.tokenizer.eos_token).strip(),
                                    add_bos=True)) for source in it.sources for i in range(len(source))]
    rows = it.num_batches * it.batch_size
    if not rows:
        raise ValueError(f"inspect: {len(lengths)} examples fill no batch of {it.batch_size} rows of {it.seq_len} "
                         "tokens (an example whose trained tokens lie past seq_len is dropped): raise --seq_len "
                         "or lower --batch_size")
    slots = sum(n - 1 for n in lengths)
    stats = {"sources": [s.name for s in it.sources], "examples": len(lengths), "tokens": sum(lengths),
             "mean_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens_before_truncation": max(full),
             "truncated": sum(f > it.max_len for f in full), "seq_len": it.seq_len, "packing": it.packing,
             "batches_per_epoch": it.num_batches, "packing_efficiency": round(slots / (rows * it.seq_len), 4),
             "bad_records_skipped": it.report.total}
    print("== stats")
    print(json.dumps(stats, indent=1))
    if it.report.total:
        print(it.report.summary())
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    commands = {"convert": _convert, "build": _build, "inspect": _inspect}
    if argv[0] not in commands:
        print(f"lumos-jax data: unknown subcommand {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return commands[argv[0]](argv[1:])
    except (ValueError, FileNotFoundError) as e:
        # gin appends "In call to configurable ..." lines; the first line names what and where.
        lines = str(e).strip().splitlines()
        cls = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
        raise cls(lines[0] if lines else type(e).__name__) from None

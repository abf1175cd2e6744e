"""Extract nouns (keywords) from captions and write them into each record's ``nouns`` list.

INPUT is an annotation file (a JSON list of records whose ``caption`` is a string or a list of strings) or a
plain-text file with one caption per line. Backends: ``lexicon`` (offline, default), ``llm`` (a local model via
transformers) and ``api`` (an OpenAI-compatible chat-completions endpoint). Failed records keep their old
nouns and are listed in OUTPUT.failures.json.

--from-image (archives without captions): the paper's protocol derives test-time nouns from the ground-truth
captions, which a real archive does not have; this mode is what to use on real archives. INPUT is then a folder
of images or an annotation file; each image is scored against a remote-sensing vocabulary (the packaged
rs_vocabulary.txt or --vocabulary-file) with the model's own text tower ("a satellite image of {noun}"), and the
--top-k nouns with softmax probability >= --threshold are written as {"image": ..., "nouns": [...]} records.

example:
  mpsclip keywords captions.json --out captions_nouns.json
  mpsclip keywords test.json --out out.json --evaluate
  mpsclip keywords captions.txt --out out.json --backend api --api-url http://localhost:8000/v1 \\
      --api-model qwen2.5-7b-instruct --concurrency 8
  mpsclip keywords archive_images/ --from-image --checkpoint model.safetensors --out archive_nouns.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mpsclip.choices import KEYWORD_BACKENDS
from mpsclip.commands._args import add_checkpoint, add_device, add_out, add_quiet

HELP = "extract nouns from captions (lexicon, local LLM or chat API) into each record's 'nouns'"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "input", type=Path, help="annotation .json or plain-text file (one caption per line); --from-image: or a folder"
    )
    add_out(parser, "where to write the records as JSON", required=True, metavar="OUT.json")
    parser.add_argument("--backend", choices=KEYWORD_BACKENDS, default="lexicon")
    score = parser.add_mutually_exclusive_group()
    score.add_argument("--evaluate", action="store_true", help="print P/R/F1 against the input's own 'nouns'")
    score.add_argument("--score-against", type=Path, metavar="REF.json", help="print P/R/F1 against REF's nouns")
    parser.add_argument("--vocabulary", type=Path, help="lexicon: vocabulary file (default: the packaged one)")
    parser.add_argument("--prompt-file", type=Path, help="llm/api: instruction text, {caption} is replaced")
    parser.add_argument("--llm-model", help="llm: local model folder or Hugging Face cache id")
    add_device(parser, "llm, --from-image")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="llm: captions per generate call; --from-image: images per batch"
    )
    parser.add_argument("--api-url", help="api: endpoint base URL (env MPSCLIP_API_URL)")
    parser.add_argument("--api-model", help="api: model name (env MPSCLIP_API_MODEL)")
    parser.add_argument("--api-key", help="api: bearer key (env OPENAI_API_KEY)")
    parser.add_argument("--concurrency", type=int, default=8, help="api: requests in flight")
    parser.add_argument("--cache", type=Path, help="api: reply cache folder (default: OUTPUT.cache/)")
    add_quiet(parser)
    image = parser.add_argument_group("--from-image (zero-shot keywords for images without captions)")
    image.add_argument("--from-image", action="store_true", help="score images against a vocabulary instead")
    add_checkpoint(image, "model weights (any file mpsclip can load)")
    image.add_argument("--arch", help="open_clip architecture for backbone-only checkpoints")
    image.add_argument("--image-root", type=Path, help="folder of an annotation INPUT's images (default: its folder)")
    image.add_argument("--top-k", type=int, default=5, help="nouns kept per image at most (default: 5)")
    image.add_argument("--threshold", type=float, default=0.02, help="min softmax probability (default: 0.02)")
    image.add_argument("--vocabulary-file", type=Path, help="nouns to score, one a line (default: rs_vocabulary.txt)")


def _backend(args: argparse.Namespace):  # -> a backend with extract(captions) -> list[Outcome]
    from mpsclip.errors import MPSCLIPError

    if args.batch_size < 1 or args.concurrency < 1:
        raise MPSCLIPError("--batch-size and --concurrency must be at least 1")
    if args.backend == "lexicon":
        from mpsclip.keywords.lexicon import LexiconBackend, default_vocabulary, load_vocabulary

        vocabulary = load_vocabulary(args.vocabulary) if args.vocabulary else default_vocabulary()
        return LexiconBackend(vocabulary)
    from mpsclip.devices import resolve_device
    from mpsclip.keywords.llm import read_prompt

    prompt = read_prompt(args.prompt_file)
    if args.backend == "llm":
        from mpsclip.keywords.llm import load_llm_backend

        backend = load_llm_backend(args.llm_model, prompt, args.batch_size, str(resolve_device(args.device)))
        backend.progress = not args.quiet
        return backend
    from mpsclip.keywords.api import ApiBackend, ApiConfig

    cache = args.cache or args.out.with_name(args.out.name + ".cache")
    config = ApiConfig.from_options(
        args.api_url, args.api_model, args.api_key, cache, prompt=prompt, concurrency=args.concurrency
    )
    return ApiBackend(config, progress=not args.quiet)


def _run_from_image(args: argparse.Namespace) -> int:
    from mpsclip.devices import resolve_device
    from mpsclip.errors import MPSCLIPError
    from mpsclip.factory import load_model
    from mpsclip.io import atomic_write
    from mpsclip.keywords import evaluate_nouns
    from mpsclip.keywords.records import json_text
    from mpsclip.keywords.zero_shot import image_keywords, list_images, load_rs_vocabulary, reference_nouns_by_image

    if args.checkpoint is None:
        raise MPSCLIPError("--from-image needs --checkpoint (the model that scores images against the vocabulary)")
    if args.score_against:
        raise MPSCLIPError("--from-image scores with --evaluate (against an annotation INPUT's nouns) only")
    images = list_images(args.input, args.image_root)
    vocabulary = load_rs_vocabulary(args.vocabulary_file)
    model = load_model(args.checkpoint, arch=args.arch)
    records = image_keywords(
        model, images, vocabulary, args.top_k, args.threshold, device=resolve_device(args.device),
        batch_size=args.batch_size,
    )
    atomic_write(args.out, json_text(records))
    found = sum(len(record["nouns"]) for record in records)
    print(f"{len(records)} images, {len(vocabulary)} vocabulary nouns, {found} nouns kept -> {args.out}")
    if args.evaluate:
        if args.input.is_dir():
            raise MPSCLIPError("--evaluate with --from-image needs an annotation INPUT with 'nouns', not a folder")
        reference = reference_nouns_by_image(args.input)
        score = evaluate_nouns([record["nouns"] for record in records], [reference[r["image"]] for r in records])
        print(f"precision {score['precision']:.4f}  recall {score['recall']:.4f}  f1 {score['f1']:.4f}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.from_image:
        return _run_from_image(args)
    from mpsclip.keywords import evaluate_nouns
    from mpsclip.keywords.records import (
        captions_of,
        failures_path,
        merge_outcomes,
        read_records,
        reference_nouns,
        write_outputs,
    )

    records = read_records(args.input)
    reference = None
    if args.evaluate:
        reference = reference_nouns(records, str(args.input))
    elif args.score_against:
        reference = reference_nouns(read_records(args.score_against), str(args.score_against))
        if len(reference) != len(records):
            from mpsclip.errors import MPSCLIPError

            raise MPSCLIPError(
                f"{args.score_against} has {len(reference)} records but {args.input} has {len(records)}; "
                "score against the reference file for the same records"
            )
    backend = _backend(args)
    captions = [caption for record in records for caption in captions_of(record)]
    merged, failures = merge_outcomes(records, backend.extract(captions))
    write_outputs(args.out, merged, failures)

    found = sum(len(record.get("nouns") or []) for record in merged)
    print(f"{len(merged)} records, {len(captions)} captions, {found} nouns -> {args.out}")
    if failures:
        print(f"{len(failures)} captions failed; their records kept old nouns: {failures_path(args.out)}")
    if reference is not None:
        score = evaluate_nouns([record.get("nouns") or [] for record in merged], reference)
        print(f"precision {score['precision']:.4f}  recall {score['recall']:.4f}  f1 {score['f1']:.4f}")
    return 0

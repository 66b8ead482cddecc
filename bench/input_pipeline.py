"""Benchmark: augmented 256x256 images per second, our tf.data pipeline vs the notebook generator.

Same images (every file of the iris archive), same process, measurements interleaved in
rounds so that background load hits both sides alike. Baseline: the notebook's
``ImageDataGenerator(rescale=1/255, horizontal_flip=True, vertical_flip=True,
width_shift_range=[-200, 200], rotation_range=360, fill_mode='nearest').flow_from_directory``.
Ours: ``pipeline.lib.inputs.make_train_dataset`` with the default augmentation (flips,
rotation, shift, zoom, contrast) at image_size 256, steady state (decoded images cached; the
first, cold epoch is reported separately). Also shown: a naive tf.data pipeline mapping the
stock Keras layers (RandomFlip/Rotation/Translation/Zoom/Contrast) over batches.

Run: ``python -m bench.input_pipeline [--rounds 5] [--batches 4]``; prints one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import tensorflow as tf

from pipeline.config import PipelineConfig
from pipeline.lib import inputs, records
from tests.support.paths import IRIS_ZIP

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png"}


def extract(zip_path: Path, target: Path) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target)
    return target


def write_records(image_root: Path, out_dir: Path) -> int:
    """Every image under ``image_root/<class>/`` into one 'train' split (the generator's set)."""
    classes = sorted(p.name for p in image_root.iterdir() if p.is_dir())
    examples = []
    for label, name in enumerate(classes):
        for path in sorted((image_root / name).iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                data = path.read_bytes()
                examples.append(records.Example(data, label, hashlib.sha256(data).hexdigest(),
                                                f"{name}/{path.name}"))
    records.write_split(out_dir, "train", examples)
    records.write_classes(out_dir, classes)
    return len(examples)


def notebook_generator(image_root: Path, batch_size: int, seed: int):
    from keras.src.legacy.preprocessing.image import ImageDataGenerator

    generator = ImageDataGenerator(
        rescale=1 / 255, horizontal_flip=True, vertical_flip=True,
        width_shift_range=[-200, 200], rotation_range=360, fill_mode="nearest",
    )
    return generator.flow_from_directory(str(image_root), target_size=(256, 256),
                                         batch_size=batch_size, seed=seed)


def naive_keras_dataset(data_dir: Path, config: PipelineConfig) -> tf.data.Dataset:
    """tf.data + stock Keras augmentation layers, mapped over batches: the 'obvious' version."""
    stack = keras.Sequential([
        keras.layers.RandomFlip("horizontal_and_vertical", seed=config.seed),
        keras.layers.RandomRotation(config.augment_rotation, fill_mode="nearest", seed=config.seed),
        keras.layers.RandomTranslation(config.augment_shift, config.augment_shift,
                                       fill_mode="nearest", seed=config.seed),
        keras.layers.RandomZoom(config.augment_zoom, fill_mode="nearest", seed=config.seed),
        keras.layers.RandomContrast(config.augment_contrast, seed=config.seed),
    ])
    examples = inputs.load_examples(data_dir, "train", config.image_size)
    return (examples.shuffle(512, seed=config.seed).repeat().batch(config.batch_size)
            .map(lambda x, y: (stack(tf.cast(x, tf.float32), training=True), y),
                 num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE))


def time_batches(iterator, count: int) -> tuple[int, float]:
    images = 0
    started = time.perf_counter()
    for _ in range(count):
        batch = next(iterator)
        images += int(batch[0].shape[0])
    return images, time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=IRIS_ZIP)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=4, help="generator batches per round")
    parser.add_argument("--ours-batches", type=int, default=40, help="our batches per round")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive Keras variant")
    args = parser.parse_args(argv)

    config = dataclasses.replace(PipelineConfig(), image_size=256, batch_size=32)
    with tempfile.TemporaryDirectory(prefix="bench-input-") as tmp:
        image_root = extract(args.zip, Path(tmp) / "raw")
        data_dir = Path(tmp) / "prepared"
        num_images = write_records(image_root, data_dir)
        steps = inputs.steps_for(num_images, config)

        gen = notebook_generator(image_root, config.batch_size, config.seed)
        ours_ds, _ = inputs.make_train_dataset(data_dir, config, first_epoch=0,
                                               last_epoch=10_000,
                                               augmenter=inputs.build_augmenter(config))
        ours = iter(ours_ds)
        # cold start: first epoch decodes, resizes and caches, and compiles the XLA warp
        cold_images, cold_seconds = time_batches(ours, steps)
        next(gen)  # generator warm-up (directory scan, first file reads)

        totals = {"generator": [0, 0.0], "ours": [0, 0.0], "naive": [0, 0.0]}
        naive = None if args.no_naive else iter(naive_keras_dataset(data_dir, config))
        if naive is not None:
            time_batches(naive, 2)  # build, trace and fill its cache before timing
        for _ in range(args.rounds):
            for name, iterator, count in (("generator", gen, args.batches),
                                          ("ours", ours, args.ours_batches),
                                          ("naive", naive, args.batches * 2)):
                if iterator is None:
                    continue
                n, seconds = time_batches(iterator, count)
                totals[name][0] += n
                totals[name][1] += seconds

    rate = {k: (v[0] / v[1] if v[1] else None) for k, v in totals.items()}
    result = {
        "bench": "input_pipeline",
        "image_size": 256,
        "batch_size": config.batch_size,
        "images_in_set": num_images,
        "cpu_count": os.cpu_count(),
        "rounds": args.rounds,
        "generator_images_per_s": round(rate["generator"], 1),
        "ours_images_per_s": round(rate["ours"], 1),
        "ours_cold_first_epoch_images_per_s": round(cold_images / cold_seconds, 1),
        "naive_keras_layers_images_per_s": round(rate["naive"], 1) if rate["naive"] else None,
        "speedup_vs_generator": round(rate["ours"] / rate["generator"], 2),
        "naive_speedup_vs_generator": (round(rate["naive"] / rate["generator"], 2)
                                       if rate["naive"] else None),
        "target_speedup": 10.0,
    }
    result["target_met"] = result["speedup_vs_generator"] >= result["target_speedup"]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

"""The test-time views layers of an exported model, in a module of its own.

A model exported with ``tta_views`` references :class:`ViewStack` and :class:`ViewMean` (and
one exported before them, :class:`DihedralView`) by their registered names (``iris>...``).
The served model ships this module in its ``code/`` folder and imports it before loading the
Keras file, so the layers need nothing else from the project: only Keras.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="iris")
class DihedralView(keras.layers.Layer):
    """One of the 8 flips and quarter turns of an image batch, by ``index`` (0: identity).

    Bit 0 of ``index`` flips left-right, bit 1 flips upside down, bit 2 transposes first, so
    indices 0-3 keep height and width and 0-7 are all symmetries of a square.
    """

    def __init__(self, index: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not 0 <= index < 8:
            raise ValueError(f"view index must be in 0..7, got {index!r}")
        self.index = int(index)

    def call(self, images: keras.KerasTensor) -> keras.KerasTensor:
        ops = keras.ops
        if self.index & 4:
            images = ops.transpose(images, (0, 2, 1, 3))
        if self.index & 2:
            images = ops.flip(images, axis=1)
        if self.index & 1:
            images = ops.flip(images, axis=2)
        return images

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        if self.index & 4:
            return (input_shape[0], input_shape[2], input_shape[1], input_shape[3])
        return tuple(input_shape)

    def get_config(self) -> dict:
        return {**super().get_config(), "index": self.index}


@keras.saving.register_keras_serializable(package="iris")
class ViewStack(keras.layers.Layer):
    """The first ``views`` dihedral views of each image, resized to a square, as one batch.

    Output row ``v * batch + i`` is view ``v`` of image ``i``, so the classifier sees all views
    in one call: its graph holds one copy of the backbone, not one per view, which makes the
    export and the first call about 3x faster and runs each batch as one backbone pass. The
    resize (``resize_options``: the model's own resize, see ``models.with_test_time_views``)
    comes first because turned views of a non-square image would not stack; on the square
    image it is the identity in the classifier's own resize.
    """

    def __init__(self, views: int, image_size: int, resize_options: dict | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)
        if not 1 <= views <= 8:
            raise ValueError(f"views must be in 1..8, got {views!r}")
        self.views, self.image_size = int(views), int(image_size)
        self.resize_options = dict(resize_options or {})

    def call(self, images: keras.KerasTensor) -> keras.KerasTensor:
        square = keras.ops.image.resize(images, (self.image_size, self.image_size),
                                        **self.resize_options)
        return keras.ops.concatenate(
            [DihedralView(index)(square) for index in range(self.views)], axis=0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch = None if input_shape[0] is None else input_shape[0] * self.views
        return (batch, self.image_size, self.image_size, input_shape[3])

    def get_config(self) -> dict:
        return {**super().get_config(), "views": self.views, "image_size": self.image_size,
                "resize_options": self.resize_options}


@keras.saving.register_keras_serializable(package="iris")
class ViewMean(keras.layers.Layer):
    """The mean over ``views`` of the rows :class:`ViewStack` stacked: one row per image."""

    def __init__(self, views: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.views = int(views)

    def call(self, probabilities: keras.KerasTensor) -> keras.KerasTensor:
        ops = keras.ops
        per_view = ops.reshape(probabilities, (self.views, -1, ops.shape(probabilities)[-1]))
        return ops.mean(per_view, axis=0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        batch = None if input_shape[0] is None else input_shape[0] // self.views
        return (batch, input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "views": self.views}


__all__ = ["DihedralView", "ViewMean", "ViewStack"]

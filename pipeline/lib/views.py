"""The test-time views layer of an exported model, in a module of its own.

A model exported with ``tta_views`` references :class:`DihedralView` by its registered name
(``iris>DihedralView``). The served model ships this module in its ``code/`` folder and
imports it before loading the Keras file, so the layer needs nothing else from the project:
only Keras.
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


__all__ = ["DihedralView"]

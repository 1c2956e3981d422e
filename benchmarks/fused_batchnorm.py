"""A BatchNormalization that uses PyTorch's fused kernel on the torch backend.

Prototype for `kerasrot` (measured by `throughput.py --fused-bn`). Keras 3
builds batch normalization from elementwise ops (`ops.moments`: mean,
square, mean, sub; then sub, add, rsqrt, mul, mul, add), each one a pass
over the activations forward and again in autograd's backward. On the
PyTorch backend, in training mode, this layer calls `torch.native_batch_norm`
instead: one fused pass forward and one backward, for NCHW and (through a
free `permute` view that torch's kernels read as channels_last memory) NHWC.

Semantics are Keras': the moving statistics are updated with Keras'
momentum and the *biased* batch variance, exactly what the parent class
does; inference, frozen layers, masks, renorm and the other backends fall
through to the parent class, unchanged.
"""

import keras


@keras.saving.register_keras_serializable(package="kerasrot")
class FusedBatchNormalization(keras.layers.BatchNormalization):
    def call(self, inputs, training=None, mask=None):
        if (
            keras.backend.backend() != "torch"
            or not (training and self.trainable)
            or mask is not None
            or self.renorm
            or inputs.ndim != 4
        ):
            return super().call(inputs, training=training, mask=mask)
        import torch

        axis = self.axis if self.axis >= 0 else inputs.ndim + self.axis
        x = inputs.float()  # Keras upcasts BN to float32 in mixed precision, too
        if axis == 3:  # NHWC tensor -> NCHW view (channels_last memory), no copy
            x = x.permute(0, 3, 1, 2)
        elif axis != 1:
            return super().call(inputs, training=training, mask=mask)
        gamma = self.gamma.value if self.scale else None
        beta = self.beta.value if self.center else None
        y, batch_mean, invstd = torch.native_batch_norm(
            x, gamma, beta, None, None, True, 0.0, self.epsilon
        )
        with torch.no_grad():
            variance = invstd.pow(-2) - self.epsilon
            self.moving_mean.assign(
                self.moving_mean * self.momentum + batch_mean * (1.0 - self.momentum)
            )
            self.moving_variance.assign(
                self.moving_variance * self.momentum + variance * (1.0 - self.momentum)
            )
        if axis == 3:
            y = y.permute(0, 2, 3, 1)
        return keras.ops.cast(y, self.compute_dtype)

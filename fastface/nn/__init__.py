"""The compact encoder CNN with hand-written forward and backward, its layers, and Adam."""
from fastface.nn.activation import relu, relu_backward
from fastface.nn.adam import Adam
from fastface.nn.conv import conv2d, conv2d_backward, im2col, im2col_backward
from fastface.nn.encoder import Encoder, EncoderGraph
from fastface.nn.linear import linear, linear_backward
from fastface.nn.pool import global_avg_pool, global_avg_pool_backward

__all__ = [
    "Encoder", "EncoderGraph", "Adam",
    "conv2d", "conv2d_backward", "im2col", "im2col_backward",
    "relu", "relu_backward", "global_avg_pool", "global_avg_pool_backward",
    "linear", "linear_backward",
]

"""The differentiable ops: each module holds one op's forward, backward and Numba twins."""
from fastface.ops.antialias import (
    AntialiasTopology, antialias, antialias_backward, antialias_topology, silhouette_edges, silhouette_pixels,
)
from fastface.ops.camera import (euler_rotation, euler_rotation_backward, perspective_projection,
                                 perspective_projection_backward, project_to_pixels,
                                 project_to_pixels_backward, rigid_transform, rigid_transform_backward)
from fastface.ops.interpolate import interpolate, interpolate_backward
from fastface.ops.losses import (PHOTOMETRIC_EPS, landmark_loss, landmark_loss_backward, photometric_loss,
                                 photometric_loss_backward, prior_loss, prior_loss_backward)
from fastface.ops.normals import VertexAdjacency, vertex_adjacency, vertex_normals, vertex_normals_backward
from fastface.ops.rasterize import (Raster, rasterize, rasterize_backward, rasterize_interpolate,
                                    rasterize_interpolate_backward)
from fastface.ops.sampling import sample_image, sample_image_backward, sample_image_mask
from fastface.ops.shading import sh_shade, sh_shade_backward, shade_vertices, shade_vertices_backward

__all__ = [
    "Raster", "rasterize", "rasterize_backward", "rasterize_interpolate", "rasterize_interpolate_backward",
    "interpolate", "interpolate_backward",
    "VertexAdjacency", "vertex_adjacency", "vertex_normals", "vertex_normals_backward",
    "sh_shade", "sh_shade_backward", "shade_vertices", "shade_vertices_backward",
    "euler_rotation", "euler_rotation_backward", "rigid_transform", "rigid_transform_backward",
    "perspective_projection", "perspective_projection_backward", "project_to_pixels", "project_to_pixels_backward",
    "sample_image", "sample_image_backward", "sample_image_mask",
    "PHOTOMETRIC_EPS", "photometric_loss", "photometric_loss_backward", "landmark_loss", "landmark_loss_backward",
    "prior_loss", "prior_loss_backward",
    "AntialiasTopology", "antialias_topology", "antialias", "antialias_backward", "silhouette_edges",
    "silhouette_pixels",
]

"""Shared benchmark workloads: functions that build inputs, importable by every bench file.

    from bench.workloads import spherical_cap
    pos, tri, colors = spherical_cap(n=189, batch=64)
"""
import numpy as np

__all__ = ["spherical_cap", "face_model_poses", "euler_to_matrix", "perspective_clip", "OpenGLRasterizer"]


def euler_to_matrix(angles):
    """(B, 3) Euler angles (pitch about x, yaw about y, roll about z), radians -> (B, 3, 3) float64.

    R = Rz(roll) @ Ry(yaw) @ Rx(pitch), the project's convention.
    """
    angles = np.asarray(angles, dtype=np.float64)
    cx, cy, cz = np.cos(angles).T
    sx, sy, sz = np.sin(angles).T
    one, zero = np.ones_like(cx), np.zeros_like(cx)
    rx = np.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1).reshape(-1, 3, 3)
    return rz @ ry @ rx


def perspective_clip(points, half_fov_deg, near, far):
    """OpenGL perspective projection of camera-space points (B, V, 3) -> clip (B, V, 4) float64.

    Square image, principal point at the centre, the given half-angle field of view.
    """
    f = 1.0 / np.tan(np.radians(half_fov_deg))
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    zc = ((far + near) * z + 2.0 * far * near) / (near - far)
    return np.stack([f * x, f * y, zc, -z], axis=-1)


def grid_mesh(n):
    """An n x n vertex grid over X, Y in [-1, 1] and its 2 (n-1)^2 triangles.

    Returns:
        xy: (n^2, 2) float64 vertex positions, row-major: vertex r n + c has X = grid[c], Y = grid[r].
        tri: (T, 3) int32, two per grid cell in cell order, counter-clockwise in the x-right, y-up plane.
    """
    grid = np.linspace(-1.0, 1.0, n)
    gx, gy = np.meshgrid(grid, grid)
    r, c = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    v00 = (r * n + c).reshape(-1)
    v01, v10, v11 = v00 + 1, v00 + n, v00 + n + 1
    # (X, Y) -> (X+dx, Y) -> (X+dx, Y+dy) turns left in the x-right, y-up plane: CCW seen from +z.
    tri = np.stack([np.stack([v00, v01, v11], -1), np.stack([v00, v11, v10], -1)], axis=1)
    return np.stack([gx, gy], axis=-1).reshape(-1, 2), tri.reshape(-1, 3).astype(np.int32)


def spherical_cap(n=189, batch=64, seed=0, xp=np, half_fov_deg=12.0, distance=0.5, max_angle=0.2):
    """A face-sized spherical cap seen under random head poses: the rasterizer's standard workload.

    An n x n vertex grid over X, Y in [-1, 1] lifted onto a sphere of radius 2,
    v = (X, Y, sqrt(4 - X^2 - Y^2) - 2) * 0.1 (metres), rotated by Euler angles drawn uniformly
    in +-max_angle rad, placed `distance` in front of an OpenGL camera (camera space z = -distance,
    looking down -z) with a `half_fov_deg` half-angle field of view. At n=189 that is 35,721
    vertices and 70,688 triangles; at 224x224 about 76% of the pixels are covered. Triangles are
    counter-clockwise seen from the camera (front-facing).

    Args:
        n: vertices per grid side (2 (n-1)^2 triangles).
        batch: number of poses B.
        seed: seed of the pose draw.
        xp: numpy or cupy; the arrays are built with numpy and moved once at the end.

    Returns:
        pos: (B, V, 4) float32 clip-space positions.
        tri: (T, 3) int32 triangle vertex indices.
        colors: (V, 3) float32 smooth per-vertex colours in [0, 1].
    """
    rng = np.random.default_rng(seed)
    xy, tri = grid_mesh(n)  # counter-clockwise seen from +z, where the camera sits
    gx, gy = xy[:, 0], xy[:, 1]
    gz = np.sqrt(4.0 - gx**2 - gy**2) - 2.0
    verts = np.stack([gx, gy, gz], axis=-1) * 0.1

    angles = rng.uniform(-max_angle, max_angle, size=(batch, 3))
    rot = euler_to_matrix(angles)
    cam = verts[None] @ rot.transpose(0, 2, 1)
    cam[..., 2] -= distance
    pos = perspective_clip(cam, half_fov_deg, near=0.1, far=10.0).astype(np.float32)

    colors = np.stack([(gx + 1) / 2, (gy + 1) / 2, 0.25 + 0.5 * (gx * gy + 1) / 2], -1)
    colors = colors.astype(np.float32)
    if xp is not np:
        return xp.asarray(pos), xp.asarray(tri), xp.asarray(colors)
    return pos, tri, colors


def face_model_poses(model, batch=8, seed=0, half_fov_deg=12.0, distance_mm=550.0, max_angle=0.2):
    """The mean face of a `fastface.FaceModel` under random head poses, like `spherical_cap`.

    Returns:
        pos: (B, V, 4) float32 clip positions (the face model is in millimetres; near 10, far 10000).
        tri: (T, 3) int32.
        colors: (V, 3) float32, the mean albedo.
    """
    rng = np.random.default_rng(seed)
    verts = np.asarray(_host(model.mean_shape), np.float64).reshape(-1, 3)
    rot = euler_to_matrix(rng.uniform(-max_angle, max_angle, size=(batch, 3)))
    cam = verts[None] @ rot.transpose(0, 2, 1)
    cam[..., 2] -= distance_mm
    pos = perspective_clip(cam, half_fov_deg, near=10.0, far=10000.0).astype(np.float32)
    tri = np.asarray(_host(model.triangles), np.int32)
    colors = np.asarray(_host(model.mean_albedo), np.float32).reshape(-1, 3)
    return pos, tri, colors


def _host(a):
    return a.get() if hasattr(a, "get") else a


class OpenGLRasterizer:
    """An independent rasterizer for comparisons: OpenGL through moderngl on a headless EGL context
    (Mesa llvmpipe on a machine without a GPU driver). Renders triangle ids and perspective-correct
    interpolated attributes (up to 3 channels) with a depth test, read back to host memory.

    Raises whatever moderngl raises when it or EGL is unavailable: callers skip on any exception.
    """

    def __init__(self, tri, n_vertices, resolution, channels=3):
        import moderngl  # noqa: PLC0415 - optional, bench and tests only

        H, W = resolution
        self.resolution = (H, W)
        self.channels = channels
        self.ctx = moderngl.create_standalone_context(backend="egl")
        self.renderer = self.ctx.info.get("GL_RENDERER", "?")
        self.prog = self.ctx.program(
            vertex_shader="""
                #version 330
                in vec4 in_pos;
                in vec3 in_attr;
                out vec3 v_attr;
                void main() { gl_Position = in_pos; v_attr = in_attr; }
            """,
            fragment_shader="""
                #version 330
                in vec3 v_attr;
                out vec4 f_out;
                // The id + 1 as a float is exact up to 2^24 triangles; 0 is the cleared background.
                void main() { f_out = vec4(v_attr, float(gl_PrimitiveID + 1)); }
            """,
        )
        self.color = self.ctx.texture((W, H), 4, dtype="f4")
        self.depth = self.ctx.depth_renderbuffer((W, H))
        self.fbo = self.ctx.framebuffer(color_attachments=[self.color], depth_attachment=self.depth)
        self.vbo_pos = self.ctx.buffer(reserve=n_vertices * 16)
        self.vbo_attr = self.ctx.buffer(reserve=n_vertices * 12)
        self.ibo = self.ctx.buffer(np.ascontiguousarray(tri, dtype=np.int32).tobytes())
        self.vao = self.ctx.vertex_array(
            self.prog, [(self.vbo_pos, "4f", "in_pos"), (self.vbo_attr, "3f", "in_attr")], self.ibo, index_element_size=4)
        self.ctx.enable(moderngl.DEPTH_TEST)  # GL_LESS: equal depths keep the earlier (lower id) triangle

    def render(self, pos, attr):
        """pos (B, V, 4) float32, attr (V, C<=3) -> (tri_id (B, H, W) int32, image (B, H, W, C) float32)."""
        H, W = self.resolution
        C = attr.shape[-1]
        padded = np.zeros((attr.shape[0], 3), np.float32)
        padded[:, :C] = attr
        self.vbo_attr.write(padded.tobytes())
        B = pos.shape[0]
        tri_id = np.empty((B, H, W), np.int32)
        image = np.empty((B, H, W, C), np.float32)
        for b in range(B):
            self.vbo_pos.write(np.ascontiguousarray(pos[b], dtype=np.float32).tobytes())
            self.fbo.use()
            self.fbo.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
            self.vao.render()
            data = np.frombuffer(self.fbo.read(components=4, dtype="f4"), np.float32).reshape(H, W, 4)
            data = data[::-1]  # OpenGL's row 0 is the bottom one
            tri_id[b] = data[..., 3].astype(np.int32) - 1
            image[b] = data[..., :C]
        return tri_id, image

    def release(self):
        self.ctx.release()

"""The pybullet scene of the mini-DROID dataset: table, Franka Panda, objects, three cameras.

One ``Scene`` is one episode: it resets the (per-process) physics client, builds a randomised
table-top scene from a ``SceneSpec`` and exposes the few operations the scripted controllers
and the renderer need (IK position control, measured end-effector state, three-view RGB and
segmentation rendering).

Conventions (docs/FORMATS.md):

* World frame = robot base frame: the Panda base sits at the origin on the table top (z = 0).
* The end effector is the ``panda_grasptarget`` link (the point between the finger tips).
* Orientation is stored as a rotation vector of ``R @ R_down.T`` where ``R_down`` is the
  "gripper pointing straight down" orientation; a pure yaw by ``a`` about the world z axis is
  ``(0, 0, a)``. This is continuous around the working orientation (no Euler +-pi flips).
* Gripper opening is in [0, 1], 1 = fully open (8 cm between the fingers).
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pybullet as p
import pybullet_data

from persistworld.utils.io import atomic_write_text

VIEWS: tuple[str, ...] = ("ext1", "ext2", "wrist")
CLASSES: dict[str, int] = {"background": 0, "robot": 1, "object": 2}
SHAPES: tuple[str, ...] = ("cube", "cylinder", "sphere")

# -- robot constants -----------------------------------------------------------------------
ARM_JOINTS = tuple(range(7))
FINGER_JOINTS = (9, 10)
HAND_LINK = 8
EEF_LINK = 11                                   # panda_grasptarget
FINGER_MAX = 0.04                               # per finger, metres
ARM_FORCES = (87.0, 87.0, 87.0, 87.0, 12.0, 12.0, 12.0)
FINGER_FORCE = 40.0
LOWER = (-2.8973, -1.7628, -2.8973, -3.0718, -2.8973, -0.0175, -2.8973, 0.0, 0.0)
UPPER = (2.8973, 1.7628, 2.8973, -0.0698, 2.8973, 3.7525, 2.8973, 0.04, 0.04)
RANGES = tuple(u - lo for lo, u in zip(LOWER, UPPER))
# "elbow up, gripper down" with the grasp point at about (0.48, 0, 0.16): start and IK rest pose
REST_POSE = (0.0, 0.0753, 0.0, -2.4623, 0.0, 2.5373, math.pi / 4, FINGER_MAX, FINGER_MAX)

# -- workspace (metres, world frame) ---------------------------------------------------------
TABLE_TOP_Z = 0.0
WORKSPACE_X = (0.45, 0.63)                      # where objects start and goals lie
WORKSPACE_Y = (-0.13, 0.13)
HOME_POS = (0.48, 0.0, 0.17)                    # idle / retreat position of the grasp point

OBJECT_MASS = 0.15                              # kg
SOLVER_ITERATIONS = 50

# quaternion (x, y, z, w) of the gripper pointing down (hand z axis = world -z), yaw 0
Q_DOWN = np.array([1.0, 0.0, 0.0, 0.0])


# ============================================================================================
# rotation helpers (numpy, quaternions as x, y, z, w)
# ============================================================================================
def quat_mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ax, ay, az, aw = a
    bx, by, bz, bw = b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw,
                     aw * bw - ax * bx - ay * by - az * bz])


def quat_conj(q: np.ndarray) -> np.ndarray:
    return np.array([-q[0], -q[1], -q[2], q[3]])


def quat_to_rotvec(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=np.float64)
    q = q / np.linalg.norm(q)
    if q[3] < 0:
        q = -q
    s = np.linalg.norm(q[:3])
    if s < 1e-12:
        return 2.0 * q[:3]
    angle = 2.0 * math.atan2(s, q[3])
    return q[:3] / s * angle


def rotvec_to_quat(v: Sequence[float]) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    angle = float(np.linalg.norm(v))
    if angle < 1e-12:
        return np.array([0.5 * v[0], 0.5 * v[1], 0.5 * v[2], 1.0]) / np.sqrt(1 + 0.25 * angle ** 2)
    axis = v / angle
    return np.concatenate([axis * math.sin(angle / 2), [math.cos(angle / 2)]])


def quat_to_relrot(q: Sequence[float]) -> np.ndarray:
    """Rotation vector of ``R(q) @ R_down.T`` (see module docstring)."""
    return quat_to_rotvec(quat_mul(np.asarray(q, dtype=np.float64), quat_conj(Q_DOWN)))


def relrot_to_quat(v: Sequence[float]) -> np.ndarray:
    return quat_mul(rotvec_to_quat(v), Q_DOWN)


# ============================================================================================
# per-process physics client and low-poly robot model
# ============================================================================================
_CLIENT: dict[int, int] = {}                    # pid -> physics client id
_URDF_PATH: dict[int, str] = {}                 # pid -> low-poly URDF path


def get_client() -> int:
    """The DIRECT-mode physics client of this process (created on first use)."""
    pid = os.getpid()
    if pid not in _CLIENT or not p.isConnected(_CLIENT[pid]):
        _CLIENT[pid] = p.connect(p.DIRECT)
    return _CLIENT[pid]


def disconnect_client() -> None:
    cid = _CLIENT.pop(os.getpid(), None)
    if cid is not None and p.isConnected(cid):
        p.disconnect(cid)


def lowpoly_panda_urdf() -> str:
    """Path of a copy of pybullet_data's Panda URDF whose visuals are the low-poly collision
    meshes (the stock visual meshes cost ~30 ms per image in TinyRenderer).

    The copy lives in a temp folder named after its content, shared by all processes (pool
    workers exit without running ``atexit`` hooks, so per-process folders would pile up)."""
    pid = os.getpid()
    if pid in _URDF_PATH and Path(_URDF_PATH[pid]).exists():
        return _URDF_PATH[pid]
    src_dir = Path(pybullet_data.getDataPath()) / "franka_panda"
    text = (src_dir / "panda.urdf").read_text()
    text = text.replace("package://meshes/visual/", "package://meshes/collision/")
    text = re.sub(r"package://meshes/", (src_dir / "meshes").as_posix() + "/", text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"persistworld_panda_{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "panda_lowpoly.urdf"
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    _URDF_PATH[pid] = str(path)
    return str(path)


# ============================================================================================
# randomised scene description
# ============================================================================================
_OBJECT_COLOURS = (  # saturated colours that stand out from the table and the white robot
    (0.85, 0.10, 0.10), (0.10, 0.55, 0.95), (0.10, 0.75, 0.20), (0.95, 0.75, 0.05),
    (0.95, 0.45, 0.05), (0.65, 0.15, 0.85), (0.05, 0.80, 0.80), (0.95, 0.25, 0.60),
)
_TABLE_COLOURS = (  # wood, grey, dark, light tones
    (0.55, 0.40, 0.25), (0.62, 0.48, 0.32), (0.45, 0.45, 0.47), (0.30, 0.30, 0.33),
    (0.70, 0.68, 0.62), (0.40, 0.30, 0.22), (0.35, 0.42, 0.50), (0.50, 0.52, 0.42),
)

TABLE_PATTERNS = ("plain", "wood", "tiles")
_WALL_COLOURS = ((0.85, 0.85, 0.82), (0.75, 0.80, 0.85), (0.80, 0.76, 0.68), (0.62, 0.64, 0.66))


def _jitter_colour(rng: np.random.Generator, rgb: Sequence[float], amount: float) -> list[float]:
    c = np.clip(np.asarray(rgb) + rng.uniform(-amount, amount, size=3), 0.0, 1.0)
    return [round(float(x), 4) for x in c]


@dataclass
class SceneSpec:
    """Everything random about one episode's scene (stored in the episode's ``meta``)."""
    shape: str
    size: float                         # cube edge / cylinder & sphere diameter (m)
    height: float                       # object height (m)
    object_rgb: list[float]
    object_xy: list[float]
    object_yaw: float
    table_rgb: list[float]
    mat_rgb: list[float]                # a placemat patch under the workspace (texture)
    mat_xy: list[float]
    mat_size: list[float]
    stripes: int                        # number of tape stripes across the table (texture)
    stripe_rgb: list[float]
    pattern: str                        # table texture: plain | wood | tiles
    texture_seed: int
    distractors: list[dict] = field(default_factory=list)
    camera_offsets: list[list[float]] = field(default_factory=list)   # ext1, ext2 (m)
    light_dir: list[float] = field(default_factory=lambda: [0.3, 0.4, 1.0])
    wall_rgb: list[float] = field(default_factory=lambda: [0.8, 0.8, 0.78])

    def to_meta(self) -> dict:
        return asdict(self)


def sample_scene_spec(rng: np.random.Generator, camera_jitter: float) -> SceneSpec:
    """Draw a random scene (``camera_jitter``: std of the external-camera position offsets)."""
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    if shape == "cube":
        size = float(rng.uniform(0.045, 0.060))
        height = size
    elif shape == "cylinder":
        size = float(rng.uniform(0.050, 0.062))
        height = float(rng.uniform(0.045, 0.060))
    else:
        size = float(rng.uniform(0.054, 0.064))
        height = size
    obj_rgb = _jitter_colour(rng, _OBJECT_COLOURS[int(rng.integers(len(_OBJECT_COLOURS)))], 0.08)
    table_rgb = _jitter_colour(rng, _TABLE_COLOURS[int(rng.integers(len(_TABLE_COLOURS)))], 0.05)
    mat_rgb = _jitter_colour(rng, _TABLE_COLOURS[int(rng.integers(len(_TABLE_COLOURS)))], 0.12)
    xy = [float(rng.uniform(*WORKSPACE_X)), float(rng.uniform(*WORKSPACE_Y))]
    # static clutter beside the workspace band (never where objects start, goals or pushes lie);
    # movable, so an arm that brushes one pushes it aside; class "background" in the masks
    distractors = []
    for _ in range(int(rng.integers(0, 3))):
        side = 1.0 if rng.uniform() < 0.5 else -1.0
        dxy = [float(rng.uniform(0.38, 0.70)), side * float(rng.uniform(0.22, 0.30))]
        if any(math.dist(dxy, d["xy"]) < 0.08 for d in distractors):
            continue
        hs = [float(rng.uniform(0.015, 0.03)), float(rng.uniform(0.015, 0.03)),
              float(rng.uniform(0.01, 0.03))]
        distractors.append({"xy": dxy, "half_extents": hs,
                            "yaw": float(rng.uniform(-math.pi, math.pi)),
                            "rgb": _jitter_colour(rng, [float(rng.uniform(0.25, 0.85))] * 3,
                                                  0.06)})
    offsets = [[float(x) for x in rng.normal(0.0, camera_jitter, size=3)] for _ in range(2)]
    light = [float(rng.uniform(-0.6, 0.6)), float(rng.uniform(-0.6, 0.6)), 1.0]
    return SceneSpec(
        shape=shape, size=round(size, 5), height=round(height, 5), object_rgb=obj_rgb,
        object_xy=xy, object_yaw=float(rng.uniform(-math.pi / 4, math.pi / 4)),
        table_rgb=table_rgb, mat_rgb=mat_rgb,
        mat_xy=[float(rng.uniform(0.45, 0.62)), float(rng.uniform(-0.12, 0.12))],
        mat_size=[float(rng.uniform(0.10, 0.22)), float(rng.uniform(0.12, 0.30))],
        stripes=int(rng.integers(0, 4)),
        stripe_rgb=_jitter_colour(rng, 0.5 * np.asarray(table_rgb) + 0.5 * rng.uniform(0, 1, 3),
                                  0.0),
        pattern=TABLE_PATTERNS[int(rng.integers(len(TABLE_PATTERNS)))],
        texture_seed=int(rng.integers(2 ** 31)),
        distractors=distractors, camera_offsets=offsets, light_dir=light,
        wall_rgb=_jitter_colour(rng, _WALL_COLOURS[int(rng.integers(len(_WALL_COLOURS)))], 0.05),
    )


# table top quad (visual) and its texture: TinyRenderer's cost is per covered pixel and per
# drawn layer, so the whole table top, mat and tape stripes are ONE textured quad
TABLE_X = (-0.25, 1.05)
TABLE_Y = (-0.80, 0.80)
TEXTURE_SIZE = 256


def table_texture(spec: SceneSpec) -> np.ndarray:
    """The (N, N, 3) uint8 table-top texture; row i <-> y, column j <-> x (world metres)."""
    n = TEXTURE_SIZE
    rng = np.random.default_rng(spec.texture_seed)
    xs = TABLE_X[0] + (np.arange(n) + 0.5) / n * (TABLE_X[1] - TABLE_X[0])
    ys = TABLE_Y[0] + (np.arange(n) + 0.5) / n * (TABLE_Y[1] - TABLE_Y[0])
    gx, gy = np.meshgrid(xs, ys)                    # (n, n): [i, j] = (x_j, y_i)
    base = np.asarray(spec.table_rgb, dtype=np.float64)
    shade = np.zeros((n, n))
    if spec.pattern == "wood":                      # grain along x, wobbling lines
        freq = rng.uniform(25.0, 45.0)
        phase = rng.uniform(0, 2 * np.pi)
        wobble = 0.02 * np.sin(gx * rng.uniform(4.0, 9.0) + rng.uniform(0, 2 * np.pi))
        shade = 0.06 * np.sin((gy + wobble) * freq * 2 * np.pi / 2 + phase)
        shade += 0.03 * np.sin((gy + 0.5 * wobble) * freq * 7.3 + 2 * phase)
    elif spec.pattern == "tiles":                   # large low-contrast tiles
        tile = rng.uniform(0.15, 0.3)
        shade = 0.05 * (((np.floor(gx / tile) + np.floor(gy / tile)) % 2) * 2 - 1)
    shade += rng.normal(0.0, 0.015, size=(n, n))    # fine grain
    img = np.clip(base[None, None, :] * (1.0 + shade[..., None]), 0.0, 1.0)
    mx, my = spec.mat_xy
    mw, mh = spec.mat_size
    in_mat = (np.abs(gx - mx) <= mw / 2) & (np.abs(gy - my) <= mh / 2)
    img[in_mat] = np.asarray(spec.mat_rgb)
    for k in range(spec.stripes):                   # tape stripes across the table
        x = 0.30 + 0.55 * (k + 0.5) / spec.stripes
        img[np.abs(gx - x) <= 0.007] = np.asarray(spec.stripe_rgb)
    return np.round(img * 255.0).astype(np.uint8)


# ============================================================================================
# cameras
# ============================================================================================
# external cameras: (eye, target) before jitter. ext1 looks from the robot's left-front,
# ext2 from its right side, both framed tightly on the workspace.
# (azimuth from +x toward +y, elevation, distance) around the camera target
EXT_CAMERAS = {
    "ext1": (math.radians(45.0), math.radians(35.0), 0.48),
    "ext2": (math.radians(-65.0), math.radians(35.0), 0.47),
}
EXT_TARGET = (0.54, 0.0, 0.10)
EXT_FOV = 36.0          # vertical field of view (deg)
WRIST_FOV = 75.0
# wrist camera in the hand frame (z along the fingers, y along the finger motion)
WRIST_EYE = (0.07, 0.0, 0.035)
WRIST_TARGET = (0.0, 0.0, 0.17)
WRIST_UP = (1.0, 0.0, 0.0)


EXT_NEAR_FAR = (0.05, 4.0)
WRIST_NEAR_FAR = (0.01, 3.0)


def external_camera_eye(name: str, offset: Sequence[float] = (0.0, 0.0, 0.0)) -> list[float]:
    """Eye position of external camera ``name`` (looking at ``EXT_TARGET``), plus ``offset``
    (the episode's jitter)."""
    az, el, dist = EXT_CAMERAS[name]
    t = EXT_TARGET
    eye = [t[0] + dist * math.cos(el) * math.cos(az), t[1] + dist * math.cos(el) * math.sin(az),
           t[2] + dist * math.sin(el)]
    return [e + o for e, o in zip(eye, offset)]


def look_at(eye: Sequence[float], target: Sequence[float], up: Sequence[float]) -> np.ndarray:
    """4x4 OpenGL view matrix (row-major; pybullet's ``computeViewMatrix`` is its transpose,
    flattened)."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    f = target - eye
    f /= np.linalg.norm(f)
    s = np.cross(f, up)
    s /= np.linalg.norm(s)
    u = np.cross(s, f)
    m = np.eye(4)
    m[0, :3], m[1, :3], m[2, :3] = s, u, -f
    m[:3, 3] = -m[:3, :3] @ eye
    return m


def perspective(fov_deg: float, aspect: float, near: float, far: float) -> np.ndarray:
    """4x4 OpenGL projection (row-major; pybullet's ``computeProjectionMatrixFOV``)."""
    f = 1.0 / math.tan(math.radians(fov_deg) / 2.0)
    m = np.zeros((4, 4))
    m[0, 0], m[1, 1] = f / aspect, f
    m[2, 2], m[2, 3] = (far + near) / (near - far), 2.0 * far * near / (near - far)
    m[3, 2] = -1.0
    return m


def external_camera_matrices(image_h: int, image_w: int) -> dict[str, np.ndarray]:
    """Projection @ view (4x4, row-major) of each external camera without jitter: world point
    (x, y, z, 1) -> clip coordinates; pixel column = (ndc_x + 1) / 2 * w, row = (1 - ndc_y) /
    2 * h. The embedded world model's ``pose_maps`` draw the end effector with these."""
    proj = perspective(EXT_FOV, image_w / image_h, *EXT_NEAR_FAR)
    return {name: proj @ look_at(external_camera_eye(name), EXT_TARGET, (0.0, 0.0, 1.0))
            for name in EXT_CAMERAS}


GRASP_OFFSET = 0.105    # the grasp-target link sits this far along the hand's z axis
# table-top points the wrist camera's pose maps draw (a grid over the workspace)
WRIST_LANDMARKS = tuple((x, y, TABLE_TOP_Z) for x in (0.40, 0.48, 0.56, 0.64, 0.72)
                        for y in (-0.16, -0.08, 0.0, 0.08, 0.16))


def wrist_camera_rig(image_h: int, image_w: int) -> dict:
    """The wrist camera as a function of the end-effector pose (position p, orientation
    R = rot(relrot) @ R_down, the module's conventions): eye = p + R eye_e, target = p +
    R target_e, up = R up_e, with the hand-frame offsets moved to the grasp-target frame;
    ``proj`` is its 4x4 row-major projection and ``landmarks`` the table points it draws."""
    grasp = np.array([0.0, 0.0, GRASP_OFFSET])
    r_down = np.asarray(p.getMatrixFromQuaternion(Q_DOWN.tolist())).reshape(3, 3)
    return {"proj": perspective(WRIST_FOV, image_w / image_h, *WRIST_NEAR_FAR
                                ).reshape(-1).tolist(),
            "eye": (np.asarray(WRIST_EYE) - grasp).tolist(),
            "target": (np.asarray(WRIST_TARGET) - grasp).tolist(),
            "up": list(WRIST_UP), "r_down": r_down.reshape(-1).tolist(),
            "landmarks": [list(x) for x in WRIST_LANDMARKS]}


def _rotate(q: Sequence[float], v: Sequence[float]) -> np.ndarray:
    m = np.asarray(p.getMatrixFromQuaternion(q)).reshape(3, 3)
    return m @ np.asarray(v)


# ============================================================================================
# the scene
# ============================================================================================
class Scene:
    """One episode's simulated world (rebuilt from scratch by ``resetSimulation``)."""

    _texture_counter = 0

    def __init__(self, spec: SceneSpec, image_hw: tuple[int, int], physics_hz: int = 240,
                 client: int | None = None):
        self.spec = spec
        self.h, self.w = int(image_hw[0]), int(image_hw[1])
        self.cid = get_client() if client is None else client
        self.physics_hz = int(physics_hz)
        cid = self.cid
        p.resetSimulation(physicsClientId=cid)
        p.setPhysicsEngineParameter(fixedTimeStep=1.0 / self.physics_hz,
                                    numSolverIterations=SOLVER_ITERATIONS,
                                    deterministicOverlappingPairs=1, physicsClientId=cid)
        p.setGravity(0, 0, -9.81, physicsClientId=cid)
        self._build_static()
        self._build_robot()
        self._build_object()
        self._setup_cameras()

    # -- construction -----------------------------------------------------------------------
    def _box(self, half, pos, rgb, yaw=0.0, mass=0.0, collide=True) -> int:
        cid = self.cid
        vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=[*rgb, 1.0],
                                  physicsClientId=cid)
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=cid) \
            if collide else -1
        return p.createMultiBody(mass, col, vis, basePosition=pos,
                                 baseOrientation=p.getQuaternionFromEuler([0, 0, yaw]),
                                 physicsClientId=cid)

    def _quad(self, corners, rgb, collision: int = -1, pos=(0.0, 0.0, 0.0)) -> int:
        """A single-sided rectangle (4 corners counter-clockwise seen from its front, relative
        to ``pos``). A body without a visual shape would be drawn with its collision shape, so
        the table is one body: box collision shape + this quad as its only visual."""
        normal = np.cross(np.subtract(corners[1], corners[0]), np.subtract(corners[2], corners[0]))
        normal = (normal / np.linalg.norm(normal)).tolist()
        vis = p.createVisualShape(p.GEOM_MESH, vertices=[list(map(float, c)) for c in corners],
                                  indices=[0, 1, 2, 0, 2, 3], normals=[normal] * 4,
                                  uvs=[[0, 0], [1, 0], [1, 1], [0, 1]],
                                  rgbaColor=[*rgb, 1.0], physicsClientId=self.cid)
        return p.createMultiBody(0, collision, vis, basePosition=list(pos),
                                 physicsClientId=self.cid)

    def _build_static(self) -> None:
        s, cid = self.spec, self.cid
        # walls of the "lab" behind the table (no floor: the walls reach below the table top,
        # so no plane at table height z-fights with it; the wall behind the cameras is omitted)
        z0, z1 = -0.9, 1.6
        x0, x1, y0, y1 = -0.9, 1.9, -1.3, 1.3
        self._quad([[x0, y0, z0], [x0, y1, z0], [x0, y1, z1], [x0, y0, z1]], s.wall_rgb)
        self._quad([[x1, y0, z0], [x0, y0, z0], [x0, y0, z1], [x1, y0, z1]], s.wall_rgb)
        self._quad([[x0, y1, z0], [x1, y1, z0], [x1, y1, z1], [x0, y1, z1]], s.wall_rgb)
        # table: physics box with its top at z = 0, drawn as one textured quad
        tx0, tx1 = TABLE_X
        ty0, ty1 = TABLE_Y
        half = [(tx1 - tx0) / 2, (ty1 - ty0) / 2, 0.02]
        col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=cid)
        cx, cy, cz = (tx0 + tx1) / 2, (ty0 + ty1) / 2, -half[2]
        corners = [[tx0, ty0, 0.0], [tx1, ty0, 0.0], [tx1, ty1, 0.0], [tx0, ty1, 0.0]]
        self.table = top = self._quad([[x - cx, y - cy, z - cz] for x, y, z in corners],
                                      (1.0, 1.0, 1.0), collision=col, pos=(cx, cy, cz))
        tex_dir = Path(lowpoly_panda_urdf()).parent
        Scene._texture_counter += 1
        tex_path = tex_dir / f"table_{os.getpid()}_{Scene._texture_counter}.png"
        from PIL import Image  # local import: only the renderer needs PIL
        # image row 0 is the texture's v = 1 edge (OpenGL convention): flip rows (y)
        texture = np.ascontiguousarray(table_texture(s)[::-1])
        Image.fromarray(texture).save(tex_path, compress_level=0)
        tex = p.loadTexture(str(tex_path), physicsClientId=cid)
        p.changeVisualShape(top, -1, textureUniqueId=tex, physicsClientId=cid)
        tex_path.unlink()
        for d in s.distractors:
            hx, hy, hz = d["half_extents"]
            self._box([hx, hy, hz], [d["xy"][0], d["xy"][1], hz + 0.0005], d["rgb"],
                      yaw=d["yaw"], mass=0.3)

    def _build_robot(self) -> None:
        cid = self.cid
        self.robot = p.loadURDF(lowpoly_panda_urdf(), basePosition=[0, 0, 0], useFixedBase=True,
                                flags=p.URDF_ENABLE_CACHED_GRAPHICS_SHAPES, physicsClientId=cid)
        # white/grey arm, darker hand and fingers (also overrides colours of the .mtl files)
        for link in range(-1, p.getNumJoints(self.robot, physicsClientId=cid)):
            rgb = (0.93, 0.93, 0.93) if link < 7 else (0.22, 0.22, 0.24)
            if link in (3, 5):
                rgb = (0.80, 0.81, 0.84)
            p.changeVisualShape(self.robot, link, rgbaColor=[*rgb, 1.0], physicsClientId=cid)
        for j in FINGER_JOINTS:
            p.changeDynamics(self.robot, j, lateralFriction=1.5, spinningFriction=0.01,
                             physicsClientId=cid)
        self.reset_joints(REST_POSE[:7], 1.0)

    def _build_object(self) -> None:
        s, cid = self.spec, self.cid
        rgba = [*s.object_rgb, 1.0]
        if s.shape == "cube":
            half = [s.size / 2] * 3
            col = p.createCollisionShape(p.GEOM_BOX, halfExtents=half, physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_BOX, halfExtents=half, rgbaColor=rgba,
                                      physicsClientId=cid)
        elif s.shape == "cylinder":
            col = p.createCollisionShape(p.GEOM_CYLINDER, radius=s.size / 2, height=s.height,
                                         physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_CYLINDER, radius=s.size / 2, length=s.height,
                                      rgbaColor=rgba, physicsClientId=cid)
        elif s.shape == "sphere":
            col = p.createCollisionShape(p.GEOM_SPHERE, radius=s.size / 2, physicsClientId=cid)
            vis = p.createVisualShape(p.GEOM_SPHERE, radius=s.size / 2, rgbaColor=rgba,
                                      physicsClientId=cid)
        else:  # pragma: no cover - guarded by sample_scene_spec
            raise ValueError(f"unknown object shape {s.shape!r}")
        pos = [s.object_xy[0], s.object_xy[1], TABLE_TOP_Z + s.height / 2 + 0.001]
        self.object = p.createMultiBody(OBJECT_MASS, col, vis, basePosition=pos,
                                        baseOrientation=p.getQuaternionFromEuler(
                                            [0, 0, s.object_yaw]), physicsClientId=cid)
        p.changeDynamics(self.object, -1, lateralFriction=1.2, spinningFriction=0.002,
                         rollingFriction=0.0 if s.shape == "cube" else 0.001,
                         physicsClientId=cid)
        p.changeDynamics(self.table, -1, lateralFriction=0.6, physicsClientId=cid)

    def _setup_cameras(self) -> None:
        aspect = self.w / self.h
        self.ext_view = {}
        for k, name in enumerate(("ext1", "ext2")):
            off = self.spec.camera_offsets[k] if self.spec.camera_offsets else [0, 0, 0]
            self.ext_view[name] = p.computeViewMatrix(external_camera_eye(name, off),
                                                      EXT_TARGET, [0, 0, 1],
                                                      physicsClientId=self.cid)
        self.ext_proj = p.computeProjectionMatrixFOV(EXT_FOV, aspect, *EXT_NEAR_FAR,
                                                     physicsClientId=self.cid)
        self.wrist_proj = p.computeProjectionMatrixFOV(WRIST_FOV, aspect, *WRIST_NEAR_FAR,
                                                       physicsClientId=self.cid)

    # -- robot state and control -------------------------------------------------------------
    def reset_joints(self, arm: Sequence[float], opening: float) -> None:
        for j, q in zip(ARM_JOINTS, arm):
            p.resetJointState(self.robot, j, float(q), physicsClientId=self.cid)
        for j in FINGER_JOINTS:
            p.resetJointState(self.robot, j, FINGER_MAX * float(opening), physicsClientId=self.cid)
        self._arm_target = [float(q) for q in arm]
        self._grip_target = float(opening)
        self._send_motors()

    def eef_state(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Measured (grasp-point position, quaternion xyzw, gripper opening in [0, 1])."""
        st = p.getLinkState(self.robot, EEF_LINK, computeForwardKinematics=True,
                            physicsClientId=self.cid)
        fingers = [p.getJointState(self.robot, j, physicsClientId=self.cid)[0]
                   for j in FINGER_JOINTS]
        opening = float(np.clip(sum(fingers) / (2 * FINGER_MAX), 0.0, 1.0))
        return np.asarray(st[4]), np.asarray(st[5]), opening

    def object_pose(self) -> tuple[np.ndarray, np.ndarray]:
        pos, orn = p.getBasePositionAndOrientation(self.object, physicsClientId=self.cid)
        return np.asarray(pos), np.asarray(orn)

    def object_speed(self) -> float:
        lin, _ = p.getBaseVelocity(self.object, physicsClientId=self.cid)
        return float(np.linalg.norm(lin))

    def contacts(self) -> tuple[int, bool]:
        """(fingers touching the object (0-2), whether any robot link touches it)."""
        pts = p.getContactPoints(self.robot, self.object, physicsClientId=self.cid)
        links = {pt[3] for pt in pts}
        return sum(j in links for j in FINGER_JOINTS), bool(pts)

    def command(self, pos: Sequence[float], quat: Sequence[float], opening: float) -> None:
        """Set the position-control targets for a Cartesian grasp-point pose (via IK)."""
        cur = [p.getJointState(self.robot, j, physicsClientId=self.cid)[0] for j in ARM_JOINTS]
        rest = list(REST_POSE)
        rest[6] = cur[6]  # do not pull the wrist back to the rest yaw
        q = p.calculateInverseKinematics(
            self.robot, EEF_LINK, list(map(float, pos)), list(map(float, quat)),
            lowerLimits=list(LOWER), upperLimits=list(UPPER), jointRanges=list(RANGES),
            restPoses=rest, maxNumIterations=60, residualThreshold=1e-4,
            physicsClientId=self.cid)
        self._arm_target = [float(x) for x in q[:7]]
        self._grip_target = float(opening)
        self._send_motors()

    def _send_motors(self) -> None:
        p.setJointMotorControlArray(self.robot, list(ARM_JOINTS), p.POSITION_CONTROL,
                                    targetPositions=self._arm_target, forces=list(ARM_FORCES),
                                    positionGains=[0.08] * 7, physicsClientId=self.cid)
        g = FINGER_MAX * self._grip_target
        p.setJointMotorControlArray(self.robot, list(FINGER_JOINTS), p.POSITION_CONTROL,
                                    targetPositions=[g, g], forces=[FINGER_FORCE] * 2,
                                    positionGains=[0.05] * 2, physicsClientId=self.cid)

    def step(self, n: int) -> None:
        for _ in range(int(n)):
            p.stepSimulation(physicsClientId=self.cid)

    # -- rendering ---------------------------------------------------------------------------
    def _wrist_view(self) -> list[float]:
        st = p.getLinkState(self.robot, HAND_LINK, computeForwardKinematics=True,
                            physicsClientId=self.cid)
        pos, orn = np.asarray(st[4]), st[5]
        eye = pos + _rotate(orn, WRIST_EYE)
        target = pos + _rotate(orn, WRIST_TARGET)
        up = _rotate(orn, WRIST_UP)
        return p.computeViewMatrix(eye.tolist(), target.tolist(), up.tolist(),
                                   physicsClientId=self.cid)

    def render(self) -> tuple[np.ndarray, np.ndarray]:
        """RGB (V, H, W, 3) uint8 and class masks (V, H, W) uint8 for ``VIEWS``."""
        views = [(self.ext_view["ext1"], self.ext_proj), (self.ext_view["ext2"], self.ext_proj),
                 (self._wrist_view(), self.wrist_proj)]
        rgb = np.empty((len(views), self.h, self.w, 3), dtype=np.uint8)
        mask = np.zeros((len(views), self.h, self.w), dtype=np.uint8)
        ld = self.spec.light_dir
        for v, (view, proj) in enumerate(views):
            _, _, px, _, seg = p.getCameraImage(
                self.w, self.h, viewMatrix=view, projectionMatrix=proj, shadow=0,
                lightDirection=ld, lightAmbientCoeff=0.55, lightDiffuseCoeff=0.45,
                lightSpecularCoeff=0.05, renderer=p.ER_TINY_RENDERER,
                physicsClientId=self.cid)
            px = np.asarray(px, dtype=np.uint8).reshape(self.h, self.w, 4)
            seg = np.asarray(seg, dtype=np.int64).reshape(self.h, self.w)
            body = np.where(seg >= 0, seg & ((1 << 24) - 1), -1)
            rgb[v] = px[..., :3]
            mask[v][body == self.robot] = CLASSES["robot"]
            mask[v][body == self.object] = CLASSES["object"]
        return rgb, mask

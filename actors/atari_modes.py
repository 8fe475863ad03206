"""One Atari game in a chosen mode and difficulty, preprocessed as ale-py's vector env does.

ale-py's ``AtariVectorEnv`` (what every other Atari task uses) cannot set a game's mode or
difficulty, so a task that does (``actors.tasks.TaskVariation.mode``/``difficulty``) steps
gymnasium's single-game ALE env through :class:`AtariModePreprocessing`, which produces the same
observations: grayscale frames, ``frameskip`` emulator frames per step with the reward summed and
the last two frames max-pooled, 84x84 by area averaging, ``frame_stack`` frames stacked, up to
``noop_max`` no-ops after a reset and FIRE after it for games that need it to start. One Python
object per env, so such a task steps slower than the vectorized one.

    check_mode("breakout", mode=4, difficulty=1)     # ValueError listing the game's modes otherwise
    env = make_mode_env("breakout", EnvConfig(id="breakout", full_action_space=True), mode=4, difficulty=1)
    obs, info = env.reset(seed=0)           # uint8 [4, 84, 84]
"""

from __future__ import annotations

from collections import deque
from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["AtariModePreprocessing", "available_modes", "check_mode", "make_mode_env"]


def _gym_id(game: str) -> str:
    """ROM name -> gymnasium id: "ms_pacman" -> "ALE/MsPacman-v5"."""
    return "ALE/" + "".join(part.capitalize() for part in game.split("_")) + "-v5"


def available_modes(game: str) -> dict[str, list[int]]:
    """The modes and difficulties ``game`` has (what ALE's setMode/setDifficulty accept)."""
    import ale_py

    gym.register_envs(ale_py)
    env = gym.make(_gym_id(game))
    try:
        ale = env.unwrapped.ale
        return {"mode": [int(m) for m in ale.getAvailableModes()],
                "difficulty": [int(d) for d in ale.getAvailableDifficulties()]}
    finally:
        env.close()


def check_mode(game: str, *, mode: int | None, difficulty: int | None) -> None:
    """ValueError unless ``game`` has ``mode`` and ``difficulty`` (None: the game's default), listing the ones it has."""
    available = available_modes(game)
    for key, value in (("mode", mode), ("difficulty", difficulty)):
        if value is not None and value not in available[key]:
            raise ValueError(f"variation.{key} = {value} is invalid for {game}: its {key}s are {available[key]}")


def make_mode_env(game: str, config: Any, *, mode: int | None, difficulty: int | None) -> Any:
    """A preprocessed single-game env of ``game`` in ``mode``/``difficulty`` (checked with :func:`check_mode`)."""
    import ale_py

    chosen = {"mode": mode, "difficulty": difficulty}
    gym.register_envs(ale_py)
    env = gym.make(_gym_id(game), frameskip=1, obs_type="grayscale",
                   repeat_action_probability=config.repeat_action_probability,
                   full_action_space=config.full_action_space, max_num_frames_per_episode=config.max_episode_frames,
                   **{k: v for k, v in chosen.items() if v is not None})
    return AtariModePreprocessing(env, frameskip=config.frameskip, frame_stack=config.frame_stack,
                                  noop_max=config.noop_max, episodic_life=config.episodic_life)


def _resize(frame: np.ndarray) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize((84, 84), Image.Resampling.BOX), dtype=np.uint8)


class AtariModePreprocessing(gym.Wrapper):
    """See the module docstring (a gymnasium wrapper around a grayscale, frameskip-1 ALE env)."""

    def __init__(self, env: Any, *, frameskip: int, frame_stack: int, noop_max: int, episodic_life: bool):
        super().__init__(env)
        self.frameskip, self.noop_max, self.episodic_life = frameskip, noop_max, episodic_life
        self.observation_space = gym.spaces.Box(0, 255, (frame_stack, 84, 84), dtype=np.uint8)
        self._frames: deque[np.ndarray] = deque(maxlen=frame_stack)
        meanings = env.unwrapped.get_action_meanings()
        self._fire = meanings.index("FIRE") if "FIRE" in meanings else None
        self._lives = 0
        self._noop_rng = np.random.default_rng()

    def _observe(self) -> np.ndarray:
        return np.stack(self._frames)

    def reset(self, *, seed: int | None = None, options: Any = None) -> tuple[np.ndarray, dict]:
        if seed is not None:
            self._noop_rng = np.random.default_rng(seed)
        frame, info = self.env.reset(seed=seed)
        noops = int(self._noop_rng.integers(1, self.noop_max + 1)) if self.noop_max > 0 else 0
        for action in [0] * noops + ([self._fire] if self._fire is not None else []):
            frame, _, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                frame, info = self.env.reset()
        self._lives = self.env.unwrapped.ale.lives()
        small = _resize(frame)
        for _ in range(self._frames.maxlen):
            self._frames.append(small)
        return self._observe(), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        total, last_two = 0.0, deque(maxlen=2)
        terminated = truncated = False
        info: dict = {}
        for _ in range(self.frameskip):
            frame, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            last_two.append(frame)
            if terminated or truncated:
                break
        lives = self.env.unwrapped.ale.lives()
        if self.episodic_life and 0 < lives < self._lives:
            terminated = True
        self._lives = lives
        self._frames.append(_resize(np.maximum.reduce(list(last_two))))
        return self._observe(), total, terminated, truncated, info

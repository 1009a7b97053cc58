"""Video in real time: frames from a file, a folder, a camera or a stream; faces tracked across
frames (ByteTrack, from the `trackers` package) and recognised once per track, again only
when the track shows a clearly better view or comes back after being lost; a track's
identity is searched with the template of its best views, so one bad frame does not
rename a person.

A live source (a camera, a stream, or a file read at its own rate with live=True) is read
on its own thread that keeps only the newest frame: when recognition is slower than the
source, frames are dropped (and counted), never queued, so the answer is at most one
frame's work behind live. A file is read ahead on a thread too, but every frame is kept.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from spherecli.core.config import VideoSettings
from spherecli.core.errors import CtrlC, UserError
from spherecli.core.images import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, is_image_name, walk_images

BEST_VIEWS = 3          # the views a track's template is the mean of
VIEW_GAP = 5            # frames between the views a young track collects
BETTER = 1.25           # a view this much better (score x face size) than the best is embedded
RECHECK_LOST = 10       # a track seen again after this many frames unseen is embedded again
CORRUPT_RUN = 50        # this many unreadable frames in a row end a file


@dataclass
class Frame:
    index: int       # the frame's number in the source (gaps where live frames were dropped)
    time: float      # seconds since the source began, by its frame rate (live: the clock)
    rgb: np.ndarray


@dataclass
class SourceStats:
    read: int = 0
    dropped: int = 0
    corrupt: int = 0
    size_changes: int = 0
    reconnects: int = 0
    ended: str = ""


def is_stream(spec) -> bool:
    """A camera index or a stream URL, not a path."""
    return str(spec).isdigit() or "://" in str(spec)


def open_source(spec: str) -> tuple[object, bool, str]:
    """(what VideoCapture opens, live?, a name for messages) of a probe: a video file, a
    folder of frames, a camera index ("0") or an rtsp/http(s) URL."""
    if spec.isdigit():
        return int(spec), True, f"camera {spec}"
    if "://" in spec:
        if spec.split("://", 1)[0].lower() not in ("rtsp", "rtmp", "http", "https", "udp", "tcp"):
            raise UserError(f"{spec}: not a stream URL this reads (rtsp, rtmp, http, https, udp, tcp)")
        return spec, True, spec
    path = Path(spec)
    if not path.exists():
        raise UserError(f"{spec}: no such file, folder, camera index or stream URL")
    if path.is_file() and path.suffix.lower() not in VIDEO_EXTENSIONS:
        raise UserError(f"{spec}: not a video ({', '.join(VIDEO_EXTENSIONS)})")
    return path, False, str(path)


class FrameSource:
    """The frames of a probe, read on a thread. live: keep only the newest frame (default:
    for cameras and streams); a stream that stops is reopened up to retries times, and no
    frame for timeout seconds ends the source."""

    def __init__(self, spec: str, *, live: bool | None = None, timeout: float = 10.0, retries: int = 3):
        self.target, default_live, self.name = open_source(str(spec))
        self.live = default_live if live is None else live
        self.paced = self.live and not default_live  # a file read at its own rate, as a camera would be
        self.timeout, self.retries = timeout, retries
        self.stats = SourceStats()
        self._failed_at = -1
        self.frames = sorted(walk_images(self.target)) if isinstance(self.target, Path) and \
            self.target.is_dir() else None
        if self.frames is not None and not self.frames:
            raise UserError(f"{self.name}: no frames ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
        self.capture = None if self.frames is not None else self._open()
        self.fps = 25.0 if self.capture is None else (self.capture.get(cv2.CAP_PROP_FPS) or 25.0)
        if not 1 <= self.fps <= 240:
            self.fps = 25.0
        self.count = len(self.frames) if self.frames is not None else \
            int(self.capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0) or None
        self.started = time.monotonic()
        self._slot: list = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True, name="frames")
        self._thread.start()

    def _open(self):
        capture = cv2.VideoCapture(str(self.target) if isinstance(self.target, Path) else self.target)
        if not capture.isOpened():
            raise UserError(f"{self.name}: cannot open it as a video")
        return capture

    def _read(self):
        """(ok, BGR frame or None) of the next frame; ok False at the end."""
        if self.frames is not None:
            if self.stats.read + self.stats.corrupt >= len(self.frames):
                return False, None
            rel = self.frames[self.stats.read + self.stats.corrupt]
            bgr = cv2.imread(str(self.target / rel)) if is_image_name(rel) else None
            return True, bgr
        ok, bgr = self.capture.read()
        if ok:
            return True, bgr
        position = int(self.capture.get(cv2.CAP_PROP_POS_FRAMES) or 0)
        if not self.live and self.count and position < self.count:
            if position == self._failed_at:  # no further to read: the file was cut off
                self.stats.corrupt -= 1  # the failure before this one was the same end
                self.stats.ended = (f"the video ends early, at frame {position} of {self.count} (cut off or "
                                    "damaged)")
                return False, None
            self._failed_at = position
            return True, None  # a frame that does not decode, inside the file
        return False, None

    def _run(self) -> None:
        index, size, bad_run, started = 0, None, 0, self.started
        while not self._stop:
            ok, bgr = self._read()
            if not ok:
                if self.live and not self.paced and self._reconnect():
                    continue
                self.stats.ended = self.stats.ended or "the source ended"
                break
            if bgr is None or bgr.ndim != 3:
                self.stats.corrupt += 1
                bad_run += 1
                if bad_run >= CORRUPT_RUN:
                    self.stats.ended = f"{CORRUPT_RUN} unreadable frames in a row"
                    break
                index += 1
                continue
            bad_run = 0
            if size is not None and bgr.shape[:2] != size:
                self.stats.size_changes += 1
            size = bgr.shape[:2]
            self.stats.read += 1
            frame = Frame(index, index / self.fps if not self.live or self.paced else
                          time.monotonic() - started, np.ascontiguousarray(bgr[:, :, ::-1]))
            index += 1
            if self.paced:
                time.sleep(max(0.0, started + index / self.fps - time.monotonic()))
            with self._cond:
                if self.live:
                    self.stats.dropped += len(self._slot)
                    self._slot = [frame]
                else:
                    while len(self._slot) >= 8 and not self._stop:  # read ahead, keep every frame
                        self._cond.wait(0.1)
                    self._slot.append(frame)
                self._cond.notify_all()
        with self._cond:
            self._slot.append(None)
            self._cond.notify_all()

    def _reconnect(self) -> bool:
        """A live source that stopped: reopened up to retries times, a second apart."""
        for _ in range(self.retries):
            if self._stop:
                return False
            time.sleep(1.0)
            self.capture.release()
            try:
                self.capture = self._open()
            except UserError:
                continue
            self.stats.reconnects += 1
            return True
        self.stats.ended = f"the stream stopped and did not come back after {self.retries} tries"
        return False

    def __iter__(self):
        while True:
            with self._cond:
                waited = bool(self._cond.wait_for(lambda: self._slot, self.timeout))
                frame = self._slot.pop(0) if waited else None
                self._cond.notify_all()
            if not waited:
                self.stats.ended = f"no frame for {self.timeout:g} s"
                self.close()
            if frame is None:
                return
            yield frame

    def close(self) -> None:
        self._stop = True
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=2)
        if self.capture is not None:
            self.capture.release()


@dataclass
class Track:
    """What is known of one tracked face."""
    id: int
    first: int
    last: int
    box: list
    views: list = field(default_factory=list)    # (quality, unit feature) of its best views
    votes: dict = field(default_factory=dict)     # vote: person -> summed score of its views
    identity: str = "unknown"
    best_match: str = ""
    score: float = -1.0
    embeddings: int = 0
    embedded: int = -1                             # the frame of its last embedding
    names: list = field(default_factory=list)     # the identity after each embedding, for switches

    def as_json(self) -> dict:
        switches = sum(a != b for a, b in zip(self.names, self.names[1:]))
        return {"type": "track", "track": self.id, "first_frame": self.first, "last_frame": self.last,
                "identity": self.identity, "best_match": self.best_match, "score": round(self.score, 4),
                "unknown": self.identity == "unknown", "embeddings": self.embeddings,
                "identity_switches": switches}


def view_quality(face: dict, width: int, height: int) -> float:
    """How good a view of a face is: the detector's confidence times the face's size times the
    share of its box inside the frame (a face entering or leaving is a poor view)."""
    x1, y1, x2, y2 = face["box"]
    w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
    inside = max(0.0, min(x2, width) - max(x1, 0)) * max(0.0, min(y2, height) - max(y1, 0)) / (w * h)
    return face["score"] * min(w, h) * inside


class TrackedIdentifier:
    """Faces of a stream of frames tracked and named from a gallery (see the module's text),
    as the settings say: MTCNN on every detect_every-th frame (the tracks' last boxes
    between), a track's identity from the template of its best views or a vote of them."""

    def __init__(self, model, gallery, settings: VideoSettings, fps: float = 25.0):
        from dataclasses import replace

        from trackers import ByteTrackTracker

        from spherecli.preprocess.detect import FaceDetector

        self.model, self.gallery = model, gallery
        # A face cut by the frame's edge is seen whole a few frames later: no padded second
        # detection (the photo path's border handling) in video.
        self.detector = FaceDetector(replace(model.embedder.settings, min_face=settings.min_face,
                                             border="none"), str(model.embedder.device))
        self.detect_every, self.accumulate = settings.detect_every, settings.accumulate
        self.tracker = ByteTrackTracker(frame_rate=fps, lost_track_buffer=int(fps),
                                        minimum_consecutive_frames=1, track_activation_threshold=0.6)
        self.tracks: dict[int, Track] = {}
        self.seen: list[int] = []   # the tracks of the last detection
        self.detections, self.slot = 0, -1
        self.seconds = {"detect": 0.0, "track": 0.0, "embed": 0.0, "search": 0.0}

    def step(self, frame: Frame) -> list[dict]:
        """The frame's tracked faces as rows: frame, time, track, box, identity, score."""
        if frame.index // self.detect_every != self.slot:  # the first frame of each slot of N
            self.slot = frame.index // self.detect_every
            self._detect(frame)
        return [{"type": "frame", "frame": frame.index, "time": round(frame.time, 3), "track": t.id,
                 "box": t.box, "identity": t.identity, "score": round(t.score, 4),
                 "best_match": t.best_match, "unknown": t.identity == "unknown"}
                for t in (self.tracks[i] for i in self.seen)]

    def _detect(self, frame: Frame) -> None:
        import supervision as sv

        self.detections += 1
        t0 = time.perf_counter()
        faces = self.detector.photo(frame.rgb)[1]
        t1 = time.perf_counter()
        height, width = frame.rgb.shape[:2]
        boxes = np.array([f["box"] for f in faces], dtype=float).reshape(-1, 4)
        found = self.tracker.update(sv.Detections(xyxy=boxes, confidence=np.array(
            [f["score"] for f in faces], dtype=float), data={"face": np.arange(len(faces))}))
        self.seconds["detect"] += t1 - t0
        self.seconds["track"] += time.perf_counter() - t1
        todo, self.seen = [], []
        for track_id, i in zip(found.tracker_id, found.data.get("face", ())):  # no faces: no data
            if track_id < 0:
                continue
            face = faces[int(i)]
            track = self.tracks.get(int(track_id))
            if track is None:
                track = Track(int(track_id), frame.index, frame.index, face["box"])
                self.tracks[track.id] = track
            gap = frame.index - track.last
            track.last, track.box = frame.index, face["box"]
            self.seen.append(track.id)
            quality = view_quality(face, width, height)
            best = max((q for q, _ in track.views), default=0.0)
            collecting = len(track.views) < BEST_VIEWS and frame.index - track.embedded >= VIEW_GAP
            lost = gap > RECHECK_LOST * self.detect_every
            if not track.views or collecting or quality > BETTER * best or lost:
                todo.append((track, face, quality))
                track.embedded = frame.index
        if todo:
            t0 = time.perf_counter()
            crops = self.model.embedder.crops(frame.rgb, [f for _, f, _ in todo])
            units = self.model.calibration.unit(self.model.embedder.embed(crops))
            t1 = time.perf_counter()
            for (track, _, quality), unit in zip(todo, units):
                self._learn(track, quality, unit)
            self.seconds["embed"] += t1 - t0
            self.seconds["search"] += time.perf_counter() - t1

    def _learn(self, track: Track, quality: float, unit: np.ndarray) -> None:
        track.embeddings += 1
        track.views = sorted(track.views + [(quality, unit)], key=lambda v: -v[0])[:BEST_VIEWS]
        threshold = self.model.calibration.threshold
        if self.accumulate == "template":
            t = np.mean([u for _, u in track.views], axis=0)
            best = self.gallery.search(t / max(np.linalg.norm(t), 1e-12), 1)[0][0]
            track.identity = best.name if best.score >= threshold else "unknown"
            track.best_match, track.score = best.name, best.score
        else:  # each view votes for its best person, or for unknown; most votes, then best score, win
            best = self.gallery.search(unit, 1)[0][0]
            name = best.name if best.score >= threshold else "unknown"
            count, score = track.votes.get(name, (0, -1.0))
            track.votes[name] = (count + 1, max(score, best.score))
            track.identity = max(track.votes, key=track.votes.get)
            track.score = track.votes[track.identity][1]
            track.best_match = best.name if track.identity == "unknown" else track.identity
        track.names.append(track.identity)


def check_display() -> None:
    """A live window needs a display: say so before any work, not after it."""
    import os
    import sys

    display = os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    if sys.platform.startswith("linux") and not display:
        raise UserError("`show`: there is no display here (no DISPLAY); write the answers with `annotate` "
                        "instead")


class VideoRun:
    """`identify` of a video, camera or stream with tracking: rows() yields a "frame" record
    per tracked face per frame; after it ends, or is interrupted (close() in a finally),
    summary() gives one "track" record per track and a "source" record of counts and
    speed; write() does all of it into the CSV and the log. annotate: a video file at the
    source's rate; show: a live window."""

    def __init__(self, model, gallery, probe: str, settings: VideoSettings | None = None, *,
                 live: bool | None = None, annotate=None, show: bool = False):
        settings = settings or VideoSettings()
        if show:
            check_display()
        self.source = FrameSource(probe, live=live, timeout=settings.timeout)
        self.ident = TrackedIdentifier(model, gallery, settings, fps=self.source.fps)
        self.annotate, self.show = annotate, show
        self.writer, self.size, self.lags, self.seconds, self.drawing = None, None, [], 0.0, 0.0
        self.interrupted = False
        self._ctrl_c = CtrlC()

    def write(self, sink, log=None, progress: bool = False) -> list[dict]:
        """The CSV rows into sink and every record into the log (JSON Lines, flushed each
        frame); Ctrl-C ends it like the source's end (interrupted is then True), so that the
        annotated video plays and the log holds every track. Returns summary()."""
        import json

        from spherecli.recognition.identify import write_csv

        name = self.source.name if is_stream(self.source.name) else Path(self.source.name).name
        journal = open(log, "w", encoding="utf-8") if log else None

        def frames():
            for row in self.rows(progress):
                if journal:
                    journal.write(json.dumps(row) + "\n")
                    journal.flush()
                yield {**row, "source": name}
        try:
            with self._ctrl_c:
                write_csv(frames(), sink)
        except KeyboardInterrupt:
            self.interrupted = True
        finally:
            self.close()
            summary = self.summary()
            if journal:
                journal.writelines(json.dumps(r) + "\n" for r in summary)
                journal.close()
        return summary

    def rows(self, progress: bool = False):
        from tqdm import tqdm

        started = time.perf_counter()
        bar = tqdm(total=None if self.source.live else self.source.count, desc="identify", unit="frame",
                   disable=not progress, dynamic_ncols=True)
        try:
            for frame in self.source:
                # Ctrl-C waits for the frame's end, and the consumer's writing of its rows, so
                # that the video, the CSV and the log hold the same frames.
                with self._ctrl_c.hold():
                    t0 = time.perf_counter()
                    rows = self.ident.step(frame)
                    if self.annotate is not None or self.show:
                        t1 = time.perf_counter()
                        shown = self._picture(frame, rows)
                        self.drawing += time.perf_counter() - t1
                        if not shown:
                            break
                    self.lags.append(time.perf_counter() - t0)
                    bar.update()
                    yield from rows
                if self._ctrl_c.pressed:
                    raise KeyboardInterrupt
        finally:
            bar.close()
            self.seconds += time.perf_counter() - started

    def _picture(self, frame: Frame, rows: list[dict]) -> bool:
        """Draw the frame's answers into the video and the window; False when the window's
        viewer pressed q or Esc."""
        from spherecli.recognition.identify import draw

        picture = draw(frame.rgb, rows)
        if self.annotate is not None:
            if self.writer is None:
                self.size = (picture.shape[1], picture.shape[0])
                self.writer = cv2.VideoWriter(str(self.annotate), cv2.VideoWriter_fourcc(*"mp4v"),
                                              self.source.fps, self.size)
            if (picture.shape[1], picture.shape[0]) != self.size:
                picture = cv2.resize(picture, self.size)  # a stream that changed its frame size
            self.writer.write(picture)
        if self.show:
            try:
                cv2.imshow(self.source.name, picture)
            except cv2.error as e:
                raise UserError(f"`show`: OpenCV cannot open a window here ({str(e).strip()[:120]})") \
                    from None
            return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)
        return True

    def close(self) -> None:
        """Stop reading and finish the annotated video, so that it plays."""
        self.source.close()
        if self.writer is not None:
            self.writer.release()
            self.writer = None
        if self.show:
            cv2.destroyAllWindows()

    def summary(self) -> list[dict]:
        s, lags = self.source.stats, self.lags
        return [t.as_json() for t in self.ident.tracks.values()] + [{
            "type": "source", "source": self.source.name, "live": self.source.live,
            "fps": round(self.source.fps, 3), "frames_read": s.read, "frames_done": len(lags),
            "dropped": s.dropped, "unreadable": s.corrupt, "size_changes": s.size_changes,
            "reconnects": s.reconnects, "ended": s.ended, "detections": self.ident.detections,
            "seconds": round(self.seconds, 3),
            "frames_per_second": round(len(lags) / self.seconds, 2) if self.seconds else None,
            "ms_per_frame_p50": round(1e3 * float(np.percentile(lags, 50)), 2) if lags else None,
            "ms_per_frame_p99": round(1e3 * float(np.percentile(lags, 99)), 2) if lags else None,
            "ms_per_frame_by_part": {part: round(1e3 * t / max(1, len(lags)), 2) for part, t in
                                     {**self.ident.seconds, "draw and write": self.drawing}.items()}}]

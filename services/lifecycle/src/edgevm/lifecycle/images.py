"""image.* commands: the node's images, their files in the store and their records in `edgevm_images`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from edgevm.lifecycle.imagestore import ImageStore
from edgevm.lifecycle.intents import Intents, KeptRequests, RequestUnreadable
from edgevm.lifecycle.killhook import with_kill_hook
from edgevm.lifecycle.paths import PathRejected, confine
from edgevm.shared.bus import current_values
from edgevm.shared.clock import now
from edgevm.shared.commands import Empty, ImageList, ImageRef, ImportImage, TaskReply
from edgevm.shared.errors import Conflict, EdgevmError, NotFound
from edgevm.shared.ids import new_id
from edgevm.shared.objects import Image
from edgevm.shared.taskrunner import Progress, TaskRunner, Work

log = logging.getLogger(__name__)

_decoder = msgspec.json.Decoder(Image)


class ImageService:
    """Imports, lists and deletes images; knows which are in use through `users`."""

    def __init__(
        self,
        kv: KeyValue,
        node: str,
        store: ImageStore,
        runner: TaskRunner,
        import_roots: list[Path],
        users: Callable[[str], list[str]],
        requests: KeptRequests | None = None,
    ) -> None:
        self._kv = kv
        self._node = node
        self._store = store
        self._runner = runner
        self._import_roots = import_roots
        self._users = users
        self.images: dict[str, Image] = {}
        # Names an import or a delete of this process is working on: a second one is a 409 at once, and an
        # import and a delete of one name never touch the store's files at the same time.
        self._busy: dict[str, str] = {}
        # Imports under way, marked before the copy and cleared once the record is written or the copy gone:
        # a mark left with no record is an import a crash cut after its file was in place (see `load`).
        self.intents = Intents(store.root.parent / "importing")
        self.requests = requests or KeptRequests(store.root.parent / "requests")

    def _key(self, name: str) -> str:
        return f"{self._node}.{name}"

    async def load(self) -> None:
        """Read the node's image records."""
        for entry in (await current_values(self._kv, f"{self._node}.>")).values():
            image = _decoder.decode(entry.value or b"")
            self.images[image.name] = image
        for name in self.intents.pending():
            if name not in self.images and await self._store.remove(name):
                log.warning("image %s: its import was cut by a restart after the copy; its file was removed", name)
            self.intents.clear(name)

    def path(self, name: str) -> Path:
        """Return the file of image `name`."""
        image = self.images[name]
        return self._store.path_for(name, image.format)

    def _reserve(self, name: str, what: str) -> None:
        """Mark `name` busy with `what` (checked and set with no await between); 409 when it is busy."""
        busy = self._busy.get(name)
        if busy is not None:
            raise Conflict(f"image {name} is being {busy} right now", "name")
        self._busy[name] = what

    def _release(self, name: str) -> None:
        """The import of `name` is over: the name is free, its mark cleared."""
        self._busy.pop(name, None)
        self.intents.clear(name)

    async def import_image(self, req: ImportImage) -> TaskReply:
        """image.import: check the request now, copy in a task. The request is kept (see KeptRequests) before
        the task is written, so that a restart that cuts the copy can start it again (`resumed_import`)."""
        source = confine(req.path, self._import_roots, field="path")
        if req.name in self.images:
            raise Conflict(f"an image named {req.name} exists already", "name")
        self._reserve(req.name, "imported")
        task_id = new_id()
        try:
            self.requests.keep(task_id, "image.import", msgspec.to_builtins(req))
            self.intents.mark(req.name)
            work = with_kill_hook("image.import", self._work(req, lambda: source, resumed=False))
            task = await self._runner.submit("image.import", None, work, task_id=task_id)
        except BaseException:
            self._release(req.name)
            self.requests.drop(task_id)
            raise
        return TaskReply(task)

    def resumed_import(self, task_id: str) -> Work:
        """The work of the import task `task_id` a restart cut, from its kept request: the copy starts again
        from the source, checked as the request was. Call at start-up before commands are served: the name is
        reserved at once, so no new import or delete of it comes first. Without a readable request the work
        fails saying why (the partial copy is gone: `ImageStore.remove_partials` and `load`)."""
        try:
            body = self.requests.read(task_id, "image.import")
            if body is None:
                return failing(ImportCut("the lifecycle service restarted during the import, and its request was"
                                          " not kept (the import was asked of an older version): import the image"
                                          " again"))
            req = msgspec.convert(body, ImportImage)
            self._reserve(req.name, "imported")
        except (RequestUnreadable, msgspec.ValidationError, Conflict) as exc:
            return failing(ImportCut(f"the lifecycle service restarted during the import, which cannot go on:"
                                      f" {exc}: import the image again"))
        self.intents.mark(req.name)
        return self._work(req, lambda: self._source_again(req), resumed=True)

    def _source_again(self, req: ImportImage) -> Path:
        try:
            return confine(req.path, self._import_roots, field="path")
        except PathRejected as exc:
            raise ImportCut(f"the import was resumed after a restart of the lifecycle, but its source can no"
                            f" longer be imported: {exc}") from None

    def _work(self, req: ImportImage, source: Callable[[], Path], resumed: bool) -> Work:
        """The task of importing `req` (its name reserved and marked): copy, then record; the name is released
        at the end, not when a shutdown cuts it (the mark and the request stay for the next start)."""

        async def work(progress: Progress) -> dict[str, Any]:
            cut = False
            try:
                if resumed and req.name in self.images:
                    return msgspec.to_builtins(self.images[req.name])  # type: ignore[no-any-return]
                return await self._copy_in(req, source(), progress)
            except asyncio.CancelledError:
                cut = True
                raise
            finally:
                if not cut:
                    self._release(req.name)

        return work

    async def _copy_in(self, req: ImportImage, source: Path, progress: Progress) -> dict[str, Any]:
        done = [0]
        copy = asyncio.ensure_future(self._store.import_image(req.name, source, req.format, done.append))
        shown = 0
        while not copy.done():
            await asyncio.wait([copy], timeout=0.5)
            if done[-1] != shown and not copy.done():
                shown = done[-1]
                await progress(shown, f"copying {source.name}")
        record = copy.result()
        image = Image(req.name, record.format, req.guest_os, record.size_bytes, record.sha256, now())
        await progress(99, "recording the image")
        try:
            await self._kv.create(self._key(req.name), msgspec.json.encode(image))
        except KeyWrongLastSequenceError:
            # Only this import's own file goes: another process's import of the same name may have
            # stored a file of another format (x.qcow2 beside our x.raw), and that one is the image.
            await asyncio.to_thread(record.path.unlink, True)
            raise Conflict(f"an image named {req.name} was imported meanwhile", "name") from None
        except Exception:
            await asyncio.to_thread(record.path.unlink, True)  # no record, no image: never an orphan file
            raise
        self.images[req.name] = image
        return msgspec.to_builtins(image)  # type: ignore[no-any-return]

    async def list(self, req: Empty) -> ImageList:
        """image.list."""
        return ImageList([self.images[name] for name in sorted(self.images)])

    async def get(self, req: ImageRef) -> Image:
        """image.get."""
        image = self.images.get(req.name)
        if image is None:
            raise NotFound(f"no image named {req.name} on node {self._node}", "name")
        return image

    async def delete(self, req: ImageRef) -> Empty:
        """image.delete: refused while a VM uses the image or is being created on it."""
        image = await self.get(req)
        self._reserve(req.name, "deleted")
        try:
            # Checked and taken out of `images` with no await between: a vm.create either counts among the
            # users here (it is in flight) or, coming later, finds no such image.
            users = self._users(req.name)
            if users:
                raise Conflict(f"image {req.name} is used by VM {', '.join(users)}", "name")
            del self.images[req.name]
            try:
                await self._kv.delete(self._key(req.name))
            except BaseException:
                self.images[req.name] = image  # still recorded: still there
                raise
            await self._store.remove(req.name)
        finally:
            self._busy.pop(req.name, None)
        return Empty()


class ImportCut(EdgevmError):
    """An image import cut by a restart that cannot go on (its request was not kept, or its source is gone)."""

    code = "500"


def failing(error: EdgevmError) -> Work:
    """A task's work that fails with `error` (a resumed task that cannot go on)."""

    async def fail(progress: Progress) -> dict[str, Any] | None:
        raise error

    return fail

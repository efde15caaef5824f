"""Which tools' images a containers site's engine holds, for the tools page and placement.

A tool whose image is not on the engine still runs when the engine can pull
it: the first launch pulls. It cannot when the site never pulls
(``pull = "never"``), or when the image is a local one (``localhost/...``,
what ``labgate image build`` makes): no registry holds it. Such a tool is
not available on the site, and the reason says how to get the image.

:class:`ImagePresence` keeps what the engine last said per image. The site's
agent refreshes it in the background (:meth:`Backend.refresh_tools
<labgate.backends.base.Backend.refresh_tools>`), so the answer costs a dict
look-up. An image never asked about counts as present until the first
refresh says otherwise, as it did before any check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: The registry part of a local image: ``localhost/name``, not ``localhost:5000/name``.
LOCAL_REGISTRY = "localhost"


def is_local(image: str) -> bool:
    """Whether ``image`` lives only on engines (``localhost/...``): no registry can serve it."""
    return "/" in image and image.split("/", 1)[0] == LOCAL_REGISTRY


class ImagePresence:
    """Per image: whether the engine held it when last asked."""

    def __init__(self, pull: str) -> None:
        self.pull = pull
        self._present: dict[str, bool] = {}

    def learn(self, image: str, present: bool) -> None:
        """Record what the engine said about ``image`` (a check, a pull, a build)."""
        self._present[image] = present

    def refresh(self, images: Iterable[str], has_image: Callable[[str], bool]) -> None:
        """Ask the engine about each of ``images`` (blocking: run it in a worker thread)."""
        for image in dict.fromkeys(images):
            self._present[image] = has_image(image)

    def missing_reason(self, site: str, tool: str, image: str, buildable: bool) -> str | None:
        """Why ``tool`` cannot start on ``site`` for want of its ``image``, or None when it can."""
        if self._present.get(image, True):
            return None
        if self.pull != "never" and not is_local(image):
            return None  # the first launch pulls it
        why = "pull is 'never'" if self.pull == "never" else "a local image no registry serves"
        fix = (
            f"build it: `labgate image build {tool} --site {site}`"
            if buildable
            else f"put {image} on the engine"
        )
        return f"its image {image} is not on this site's engine ({why}); {fix}"

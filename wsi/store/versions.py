"""Replacing a published slide's version: the one protocol of re-conversion, archive/restore
and sync. The new version is built in `<id>/staging-<run>/` while the old one is served; its
manifest is written there (the version is complete), the slide unpublished, the new objects moved
in and the manifest last (the commit). A run cut short before its swap leaves the old version
served; one cut short during it leaves a complete staged version, which `finish_swap` moves in."""

from __future__ import annotations

from collections.abc import Iterable

from wsi.errors import CorruptSlide, SlideNotFound
from wsi.published.layout import MANIFEST, SLIDE_ID, STAGING, Manifest, SlideKeys
from wsi.store.objects import Store, check_slide_id, fsync_dir


def swap_in(store: Store, staged: SlideKeys, manifest: bytes, changed: Iterable[str]) -> None:
    """Replace a slide's published version (if any) by the one built in `staged`, whose
    `changed` objects are there (the others are in place already): the staged manifest is
    written first, so that a swap cut short (a kill, the store going away) is finished by
    `finish_swap` instead of leaving neither version; readers see neither version for the
    swap, never a mix. Call holding the slide's lock."""
    store.put(staged.in_store(MANIFEST), manifest)
    store.unpublish(staged.slide_id)
    store.promote(staged, [*changed, MANIFEST])  # the manifest last: the commit


def finish_swap(store: Store, slide_id: str) -> bool:
    """Call holding the slide's lock. A published slide: remove staging folders of runs
    killed before their swap. An unpublished one whose staging folder holds a complete
    version (its manifest written: `swap_in` began) was cut short during its swap: move the
    rest in and publish it. Returns whether it published a version."""
    folders = [n for n in store.children(slide_id) if n.startswith(STAGING)]
    if store.is_published(slide_id):
        for name in folders:
            store.delete_prefix(f"{slide_id}/{name}")
        return False
    for name in folders:
        staged = SlideKeys(slide_id, f"{slide_id}/{name}")
        if not store.exists(staged.in_store(MANIFEST)):
            continue
        pending = Manifest.from_bytes(store.get(staged.in_store(MANIFEST)))
        final = SlideKeys(slide_id)
        waiting = [k for k in sorted(pending.objects) if store.exists(staged.in_store(k))]
        for key, entry in pending.objects.items():
            if key not in waiting and store.size(final.in_store(key)) != entry.size:
                raise CorruptSlide(f"cannot finish publishing {slide_id}: {key} is not in place")
        store.promote(staged, [*waiting, MANIFEST])
        return True
    return False


def delete_slide(store: Store, slide_id: str) -> int:
    """Remove the published slide `slide_id` with every object of it (an erasure request, a
    slide published by mistake, an earlier de-identified copy); returns the bytes its manifest
    listed. The manifest goes first, made durable, so that readers stop seeing the slide at
    once and a deletion cut short leaves only objects no manifest lists, which the next
    conversion of the slide or deletion removes; then the slide's folder, staged versions
    included. SlideNotFound when it is not published; StoreError while a conversion of it runs
    on this machine (its lock)."""
    check_slide_id(slide_id)
    with store.slide_lock(slide_id):
        finish_swap(store, slide_id)  # a swap cut short is a published version too
        try:
            manifest = store.manifest(slide_id)
        except SlideNotFound as exc:
            raise SlideNotFound(f"slide {slide_id} is not published") from exc
        store.unpublish(slide_id)
        if not store.settings.is_s3:
            fsync_dir(store.path(slide_id))
        store.delete_prefix(slide_id)
    return manifest.stored_bytes


def interrupted_swaps(store: Store) -> list[str]:
    """Ids of slides not published whose folder holds a complete staged version: a swap
    cut short, which `finish_swap` finishes."""
    out = []
    for name in store.children():
        if not SLIDE_ID.fullmatch(name) or store.exists(SlideKeys(name).manifest):
            continue
        for folder in store.children(name):
            if not folder.startswith(STAGING):
                continue
            if store.exists(SlideKeys(name, f"{name}/{folder}").in_store(MANIFEST)):
                out.append(name)
                break
    return out

// The ruler: click-drag a line over the slide; its length in µm (or mm) from the slide's MPP.
// The two ends are kept in level-0 pixels and drawn again after every viewport change, so the
// line stays on the tissue, and its length stays right, whatever the zoom and the rotation.
"use strict";

export function formatLength(microns, digits) {
  const round = (v) => Number(v.toPrecision(digits));
  if (microns >= 1000) {
    return round(microns / 1000) + " mm";
  }
  if (microns >= 1) {
    return round(microns) + " µm";
  }
  return round(microns * 1000) + " nm";
}

export class Ruler {
  // viewer: the OpenSeadragon viewer; layer: the <svg> over it; label: an element for the text;
  // mpp: [x, y] microns per level-0 pixel, or null (then lengths are in pixels).
  constructor(viewer, layer, label, mpp) {
    this.viewer = viewer;
    this.layer = layer;
    this.label = label;
    this.mpp = mpp;
    this.lines = Array.from(layer.querySelectorAll("line"));
    this.start = null;
    this.end = null;
    this.dragging = false;
    this.active = false;
    this.onchange = null;
    layer.addEventListener("pointerdown", (event) => this._down(event));
    layer.addEventListener("pointermove", (event) => this._move(event));
    layer.addEventListener("pointerup", (event) => this._up(event));
    layer.addEventListener("pointercancel", () => {
      this.dragging = false;
    });
    viewer.addHandler("update-viewport", () => this.draw());
  }

  setActive(active) {
    this.active = active;
    this.layer.classList.toggle("active", active);
    if (this.onchange) {
      this.onchange();
    }
  }

  clear() {
    this.start = this.end = null;
    this.dragging = false;
    this.draw();
  }

  // Level-0 pixel coordinates of a pointer event (through OpenSeadragon's transforms, which
  // include the rotation).
  _imagePoint(event) {
    const box = this.layer.getBoundingClientRect();
    const pixel = new window.OpenSeadragon.Point(event.clientX - box.left, event.clientY - box.top);
    const item = this.viewer.world.getItemAt(0);
    return item.viewportToImageCoordinates(
      this.viewer.viewport.viewerElementToViewportCoordinates(pixel)
    );
  }

  _down(event) {
    if (!this.active || event.button !== 0) {
      return;
    }
    event.preventDefault();
    this.layer.setPointerCapture(event.pointerId);
    this.start = this.end = this._imagePoint(event);
    this.dragging = true;
    this.draw();
  }

  _move(event) {
    if (this.dragging) {
      this.end = this._imagePoint(event);
      this.draw();
    }
  }

  _up(event) {
    if (this.dragging) {
      this.end = this._imagePoint(event);
      this.dragging = false;
      this.draw();
    }
  }

  // Length of the line in µm (null without MPP), and in level-0 pixels.
  length() {
    if (!this.start) {
      return null;
    }
    const dx = this.end.x - this.start.x;
    const dy = this.end.y - this.start.y;
    const pixels = Math.hypot(dx, dy);
    const microns = this.mpp ? Math.hypot(dx * this.mpp[0], dy * this.mpp[1]) : null;
    return { pixels, microns };
  }

  draw() {
    const item = this.viewer.world.getItemAt(0);
    const measured = this.length();
    if (!item || !measured) {
      this.lines.forEach((line) => line.removeAttribute("x1"));
      this.layer.classList.remove("drawn");
      this.label.hidden = true;
      delete this.label.dataset.microns;
      delete this.label.dataset.pixels;
      return;
    }
    const toElement = (p) =>
      this.viewer.viewport.viewportToViewerElementCoordinates(item.imageToViewportCoordinates(p));
    const a = toElement(this.start);
    const b = toElement(this.end);
    for (const line of this.lines) {
      line.setAttribute("x1", a.x);
      line.setAttribute("y1", a.y);
      line.setAttribute("x2", b.x);
      line.setAttribute("y2", b.y);
    }
    this.layer.classList.add("drawn");
    this.label.textContent =
      measured.microns === null
        ? Math.round(measured.pixels) + " px (MPP unknown)"
        : formatLength(measured.microns, 4);
    this.label.dataset.pixels = measured.pixels.toFixed(2);
    if (measured.microns !== null) {
      this.label.dataset.microns = measured.microns.toFixed(3);
    }
    this.label.style.left = ((a.x + b.x) / 2).toFixed(1) + "px";
    this.label.style.top = ((a.y + b.y) / 2).toFixed(1) + "px";
    this.label.hidden = false;
  }
}

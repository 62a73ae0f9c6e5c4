// The slide list filters as you type (the same rule as the server's `?q=`: the text, ignoring
// case, anywhere in a slide's name or case). Without JavaScript, or when the slides take more
// than one page (only this page's cards are here), the search form asks the server.
"use strict";

const input = document.querySelector("form.search input[name=q]");
const cards = Array.from(document.querySelectorAll("#slides li[data-search]"));
const sections = Array.from(document.querySelectorAll("#slides section.case"));
const empty = document.getElementById("empty");

function filter() {
  const needle = input.value.trim().toLocaleLowerCase();
  let shown = 0;
  for (const card of cards) {
    const match = !needle || card.dataset.search.includes(needle);
    card.hidden = !match;
    shown += match ? 1 : 0;
  }
  for (const section of sections) {
    section.hidden = !section.querySelector("li[data-search]:not([hidden])");
  }
  empty.classList.toggle("shown", shown === 0);
  document.body.dataset.shown = String(shown);
}

const paged = document.querySelector("nav.pages") !== null;

if (input && cards.length && !paged) {
  input.addEventListener("input", filter);
  document.body.dataset.shown = String(cards.length);
}

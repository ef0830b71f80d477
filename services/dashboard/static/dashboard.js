// The dashboard's pages (services/dashboard): every panel fetches its figure, rendered and escaped by
// the server, and fetches it again after the refresh interval. Panels are fetched one after another,
// so one open page runs one query at a time on the SQL endpoint's few slots. The alerts page also
// listens to the live feed and puts each alert that opens at the top of its table.
"use strict";

const refreshMs = Number(document.body.dataset.refreshSeconds || 10) * 1000;
const FEED_LIMIT = 50;

async function updatePanel(panel) {
  const figure = panel.querySelector(".figure");
  const error = panel.querySelector(".error");
  try {
    const response = await fetch(panel.dataset.src, { cache: "no-store", headers: { Accept: "application/json" } });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || response.statusText);
    const open = [...figure.querySelectorAll("details")].map((details) => details.open);
    figure.innerHTML = body.html;
    figure.querySelectorAll("details").forEach((details, n) => { details.open = Boolean(open[n]); });
    panel.querySelector(".stamp").textContent = "updated " + new Date().toLocaleTimeString();
    error.hidden = true;
    panel.dataset.state = "ok";
  } catch (failure) {
    error.textContent = "Not updated: " + failure.message;
    error.hidden = false;
    panel.dataset.state = "error";
  }
}

async function refreshForever(panels) {
  for (;;) {
    for (const panel of panels) await updatePanel(panel);
    await new Promise((resolve) => setTimeout(resolve, refreshMs));
  }
}

function feedRow(columns, alert) {
  const row = document.createElement("tr");
  row.className = "new";
  row.dataset.changeId = alert.change_id;
  for (const column of columns) {
    const cell = document.createElement("td");
    if (column === "customer_key") {
      const link = document.createElement("a");
      link.href = "/customers/" + encodeURIComponent(alert[column]);
      link.textContent = alert[column];
      cell.append(link);
    } else {
      cell.textContent = alert[column] ?? "";
    }
    row.append(cell);
  }
  return row;
}

function listen(feed) {
  const state = feed.querySelector(".live-state");
  const rows = feed.querySelector("tbody");
  const columns = [...feed.querySelectorAll("thead th")].map((th) => th.textContent);
  const show = (name, text) => { state.dataset.state = name; state.textContent = text; };
  const source = new EventSource(feed.dataset.liveSrc);
  source.onopen = () => show("live", "live");
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) {   // refused: the browser will not retry by itself
      show("off", "alerts service not reachable, retrying…");
      setTimeout(() => listen(feed), refreshMs);
    } else {
      show("reconnecting", "reconnecting…");
    }
  };
  source.addEventListener("alert", (message) => {
    rows.prepend(feedRow(columns, JSON.parse(message.data)));
    while (rows.rows.length > FEED_LIMIT) rows.lastElementChild.remove();
    feed.querySelector(".feed-empty").hidden = true;
  });
}

const feed = document.getElementById("live-feed");
if (feed) listen(feed);
refreshForever([...document.querySelectorAll("[data-panel]")]);

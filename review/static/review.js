// Keys on the review page: 1-5 choose the model's top-5, n "not a refund category",
// u "photo unusable", / the category search (a form of its own: Enter there decides the typed
// category, not the first answer); on every page, z or Backspace takes back your last decision.
// Typing in a field is left alone.
(function () {
  var typing = function (e) {
    var t = e.target;
    return e.ctrlKey || e.metaKey || e.altKey ||
      (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT"));
  };
  var undo = document.getElementById("undo");
  if (undo) {
    var undone = false;
    document.addEventListener("keydown", function (e) {
      if ((e.key === "z" || e.key === "Backspace") && !typing(e)) {
        e.preventDefault();
        if (!undone) { undone = true; undo.requestSubmit(); }
      }
    });
  }
  var form = document.getElementById("decide");
  if (!form) return;
  var sent = false;
  var once = function (e) {
    if (sent) { e.preventDefault(); return; }  // one decision per page, even on a double key press
    sent = true;
  };
  form.addEventListener("submit", once);
  document.getElementById("search").addEventListener("submit", once);
  document.addEventListener("keydown", function (e) {
    if (typing(e)) return;
    if (e.key === "/") {
      e.preventDefault();
      document.getElementById("search_label").focus();
      return;
    }
    var button = form.querySelector('button[data-key="' + e.key + '"]');
    if (button) {
      e.preventDefault();
      if (!sent) form.requestSubmit(button);
    }
  });
})();

// Keys on the review page: 1-5 choose the model's top-5, n "not a refund category",
// u "photo unusable", / the category search. Typing in a field is left alone.
(function () {
  var form = document.getElementById("decide");
  if (!form) return;
  var sent = false;
  form.addEventListener("submit", function (e) {
    if (sent) { e.preventDefault(); return; }  // one decision per page, even on a double key press
    sent = true;
  });
  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    var t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.tagName === "SELECT")) return;
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

// The host page's own button opens the widget through its small page API.
document.getElementById("ask").addEventListener("click", function () {
  if (window.chatgw) window.chatgw.open();
});

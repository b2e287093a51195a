// MathJax for pymdownx.arithmatex (generic mode: \( \) and \[ \] in elements of class arithmatex) and, on the
// tutorial's page, for the $ and $$ of its markdown cells.
const notebook = document.querySelector(".jp-Notebook") !== null;
window.MathJax = {
  tex: {
    inlineMath: notebook ? [["$", "$"], ["\\(", "\\)"]] : [["\\(", "\\)"]],
    displayMath: notebook ? [["$$", "$$"], ["\\[", "\\]"]] : [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: notebook ? {} : {ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex"},
};
document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});

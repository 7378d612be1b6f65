// Loop strips wrap (three copies; the scroll jumps by one copy at either end), 360° viewers start when in view.
(function () {
  'use strict';
  window.seViewers = {};

  function setupLoop(strip) {
    var first = strip.querySelector('img');
    function width() { return first.getBoundingClientRect().width; }
    function wrap() {
      var w = width();
      if (w <= 0) return;
      if (strip.scrollLeft < w * 0.5) strip.scrollLeft += w;
      else if (strip.scrollLeft > w * 1.5) strip.scrollLeft -= w;
    }
    function start() { strip.scrollLeft = width(); }
    if (first.complete) start(); else first.addEventListener('load', start);
    strip.addEventListener('scroll', wrap);
    var dragX = null;
    strip.addEventListener('pointerdown', function (e) { dragX = e.clientX; });
    window.addEventListener('pointerup', function () { dragX = null; });
    strip.addEventListener('pointermove', function (e) {
      if (dragX === null) return;
      strip.scrollLeft -= e.clientX - dragX;
      dragX = e.clientX;
    });
  }

  function startPano(el) {
    if (el.dataset.started) return;
    el.dataset.started = '1';
    var script = document.createElement('script');
    script.src = el.dataset.pano;
    script.onload = function () {
      var id = el.dataset.panoId;
      window.seViewers[id] = pannellum.viewer(el, {
        type: 'equirectangular', panorama: window.SE_PANOS[id], autoLoad: true, ignoreGPanoXMP: true,
        haov: 360, vaov: 180, hfov: 100, showFullscreenCtrl: false
      });
    };
    document.head.appendChild(script);
  }

  document.querySelectorAll('.loop-strip').forEach(setupLoop);
  var panos = document.querySelectorAll('.pano');
  if ('IntersectionObserver' in window) {
    var seen = new IntersectionObserver(function (items) {
      items.forEach(function (item) { if (item.isIntersecting) { seen.unobserve(item.target); startPano(item.target); } });
    }, { rootMargin: '200px' });
    panos.forEach(function (el) { seen.observe(el); });
  } else {
    panos.forEach(startPano);
  }
})();

"""The container kernel: Debian's kernel source, our patch series and config
fragments (the checkout's kernel/), built for an architecture (x86_64, or
aarch64 cross-compiled) into a cached bzImage or Image that the VM runtime
boots templates of that architecture with.

    vztt kernel check   the series applies to the current Debian source (fuzz 0),
                        and the fragments survive olddefconfig
    vztt kernel build   fetch the source package through apt, apply the series,
                        tinyconfig + fragments + olddefconfig, make bzImage/Image, cache it
    vztt kernel info    version, digests, the fragments' options and whether each
                        one survived olddefconfig
  (each with --arch x86_64|aarch64, default the host's; kconfig.TARGETS)

kernel/ (VZTT_KERNEL_DIR):
  series              quilt's format: one patch per line (`name [-pN]`), # comments
  patches/            the patches, applied in series order with `patch --fuzz=0`
  container.config    the fragment every architecture gets, over `make ARCH=<arch> tinyconfig`
  arch/<arch>.config  what only that architecture (uname -m) needs, merged after it

The kernel cache (TemplateCache.kernel_dir: <cache>/kernel, or VZTT_KERNEL_CACHE):
  source/linux-source-6.1_<version>_all.deb   the source package as apt fetched it
  <version>-<arch>-s<series>-f<fragments>/    one build, keyed by source version, the
                                               architecture and the series and fragments
                                               digests (12 hex digits each): bzImage or
                                               Image, config, info.json, build.log
  kvm-probe.json                              whether KVM runs our kernel here (per boot)

A second `build` with the same key builds nothing. A build runs in the cache's
scratch area (TemplateCache.scratch("kernel"): removed at the end, or by the
next run if it was killed), logs to TemplateCache.log_path("kernel", "build"),
and its entry appears by one rename (base.files.atomic_dir), complete or not
at all.

  series.py   the series, its patches, applying them, the digests
  kconfig.py  configuring: tinyconfig + fragment + olddefconfig, what survived, why not
  source.py   Debian's source package: through apt, its date, unpacking it
  build.py    check, build, the cache's entries, info, the kernel the VM boots
"""


STEP_TIMEOUT = 900.0         # seconds for one step: a patch, a make config target, an apt download

/*
 * talos-exec ROOT PROGRAM [ARG...]: the last step of the QEMU extension test's stand-in for Talos's extension
 * runner (integration/tests/extension.rs): chroot into ROOT, then exec PROGRAM with the capabilities and
 * privileges machined gives an extension service's process:
 *
 * - every capability of machined's bounding set except CAP_SYS_BOOT and CAP_SYS_MODULE
 *   (talos: internal/app/machined/pkg/system/services/extension.go, getOCIOptions:
 *   oci.WithCapabilities(capability.AllGrantableCapabilities()); internal/pkg/capability/capability.go
 *   removes constants.DefaultDroppedCapabilities = {cap_sys_boot, cap_sys_module}). Dropping both from the
 *   bounding set before exec leaves root's effective, permitted and bounding sets exactly that;
 * - no_new_privs (runner/containerd/containerd.go, newOCISpecOpts: oci.WithNoNewPrivileges).
 *
 * Built static with musl-gcc by the test (the initramfs has no libc).
 */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

/* linux/capability.h (not in musl-gcc's include path): a stable kernel ABI */
#define CAP_SYS_MODULE 16
#define CAP_SYS_BOOT 22

static int fail(const char *what) {
  fprintf(stderr, "talos-exec: %s: %s\n", what, strerror(errno));
  return 127;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: talos-exec ROOT PROGRAM [ARG...]\n");
    return 2;
  }
  if (chroot(argv[1]) != 0) return fail("chroot");
  if (chdir("/") != 0) return fail("chdir /");
  if (prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT, 0, 0, 0) != 0) return fail("drop CAP_SYS_BOOT");
  if (prctl(PR_CAPBSET_DROP, CAP_SYS_MODULE, 0, 0, 0) != 0) return fail("drop CAP_SYS_MODULE");
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return fail("no_new_privs");
  execv(argv[2], argv + 2);
  return fail(argv[2]);
}

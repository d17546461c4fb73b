//! KVM's management layer: libvirt defines and starts the domain XML that `livemount mount`
//! rewrote (its disk a network disk, protocol nfs, pointing at this server), and the guest
//! boots to its marker. This is the test of the KVM config rewrite.
//!
//! libvirtd and virtlogd are started by `scripts/libvirt-up` (no systemd on these machines);
//! QEMU runs under TCG (`<domain type='qemu'>`).

mod common;

use common::*;

#[test]
fn virsh_defines_and_boots_the_rewritten_domain_xml_from_the_live_mount() {
    libvirt_up();

    let t = tempfile::tempdir().unwrap();
    let image = guest_image();
    std::fs::copy(&image, t.path().join("guest.img")).unwrap();
    let console = t.path().join("console.log");
    let vm = format!("lmvirt{}", std::process::id());
    let xml = format!(
        "<domain type='qemu'>\n  <name>{vm}</name>\n  <uuid>31111111-2222-4333-8444-555555555555</uuid>\n  \
         <memory unit='KiB'>262144</memory>\n  <vcpu>1</vcpu>\n  \
         <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>\n  \
         <features><acpi/></features>\n  <on_poweroff>destroy</on_poweroff>\n  <devices>\n    \
         <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'/>\n      \
         <source file='guest.img'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    \
         <interface type='user'><mac address='52:54:00:12:34:56'/><model type='virtio'/></interface>\n    \
         <serial type='file'><source path='{}'/><target port='0'/></serial>\n  </devices>\n</domain>\n",
        console.display()
    );
    let cfg = t.path().join(format!("{vm}.xml"));
    write(&cfg, xml.as_bytes());
    let repo = repo_with_backup(t.path(), &cfg);

    let _port111 = port_111_lock();
    let server = Server::start(&repo, &t.path().join("state"), "127.0.0.1:111", &[]);
    let mount = format!("{vm}-lm1");
    server.cli(&["mount", &vm]);
    // The rewritten XML, fetched over NFS as the attach instructions say.
    let def = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/{vm}.xml"))],
    );
    assert!(def.status.success());
    let def_text = String::from_utf8(def.stdout).unwrap();
    assert!(
        def_text.contains(&format!("<name>{mount}</name>")),
        "{def_text}"
    );
    assert!(
        def_text.contains("<link state='down'/>"),
        "NICs disconnected: {def_text}"
    );
    assert!(
        !def_text.contains("52:54:00:12:34:56"),
        "a new MAC: {def_text}"
    );
    assert!(
        def_text.contains("error_policy='stop' rerror_policy='stop'"),
        "an outage of the store pauses the VM rather than failing its I/O: {def_text}"
    );
    let def_path = t.path().join("def.xml");
    write(&def_path, def_text.as_bytes());

    let _domain = Domain(mount.clone());
    let out = virsh(&["define", def_path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "virsh define: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = virsh(&["start", &mount]);
    assert!(
        out.status.success(),
        "virsh start: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    // libvirt took the error policies (it checks them when it defines and starts a domain).
    let live = virsh(&["dumpxml", &mount]);
    let live = String::from_utf8_lossy(&live.stdout);
    assert!(
        live.contains("error_policy='stop'") && live.contains("rerror_policy='stop'"),
        "{live}"
    );
    let t0 = std::time::Instant::now();
    let mut log = String::new();
    while t0.elapsed().as_secs() < 120 {
        log = std::fs::read_to_string(&console).unwrap_or_default();
        if log.contains("LIVEMOUNT-GUEST-DONE") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        log.contains("LIVEMOUNT-GUEST-BOOTED") && log.contains("LIVEMOUNT-GUEST-DONE"),
        "the guest did not boot under libvirt:\n{log}"
    );
    eprintln!(
        "libvirt: guest done {:.2} s after virsh start returned",
        t0.elapsed().as_secs_f64()
    );
}

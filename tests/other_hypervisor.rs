//! Recovery on the other hypervisor (`mount --for kvm|esxi`), with clients nobody here wrote:
//! an ESXi backup of the test guest, converted to libvirt domain XML, is defined and started by
//! libvirt and boots (TCG); a KVM backup converted to a `.vmx` is read by qemu-img over
//! `nfs://` and through its VMDK descriptors, byte for byte, and survives a restart unchanged.

mod common;

use common::*;

/// Fetches the domain XML a mount converted for KVM serves, makes the two changes this machine
/// needs (TCG instead of KVM, the serial console into `console`), defines and starts it.
fn start_converted(
    server: &Server,
    dir: &std::path::Path,
    mount: &str,
    xml_file: &str,
    console: &std::path::Path,
) -> Domain {
    let def = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/{xml_file}"))],
    );
    assert!(def.status.success(), "{}", output_text(&def));
    let xml = String::from_utf8(def.stdout).unwrap();
    assert!(xml.contains(&format!("<name>{mount}</name>")), "{xml}");
    let xml = xml
        .replace("<domain type='kvm'>", "<domain type='qemu'>")
        .replace(
            "<cpu mode='host-model'>",
            "<cpu mode='custom' match='exact'><model>qemu64</model>",
        )
        .replace(
            "<serial type='pty'>\n      <target port='0'/>\n    </serial>\n    \
             <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>",
            &format!(
                "<serial type='file'><source path='{}'/><target port='0'/></serial>",
                console.display()
            ),
        );
    assert!(xml.contains("<serial type='file'>"), "{xml}");
    let def_path = dir.join(format!("{mount}.xml"));
    write(&def_path, xml.as_bytes());
    let domain = Domain(mount.to_owned());
    let out = virsh(&["define", def_path.to_str().unwrap()]);
    assert!(out.status.success(), "virsh define: {}", output_text(&out));
    let out = virsh(&["start", mount]);
    assert!(
        out.status.success(),
        "virsh start {mount}: {}\n{xml}\n{}",
        output_text(&out),
        server.log_text()
    );
    domain
}

/// Waits up to 120 s for `marker` in the console log; the log.
fn wait_for(console: &std::path::Path, marker: &str) -> String {
    let t0 = std::time::Instant::now();
    let mut log = String::new();
    while t0.elapsed().as_secs() < 120 {
        log = std::fs::read_to_string(console).unwrap_or_default();
        if log.contains(marker) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    log
}

#[test]
fn an_esxi_backup_mounted_for_kvm_is_defined_started_and_boots_under_libvirt() {
    libvirt_up();
    let t = tempfile::tempdir().unwrap();
    // The test guest as an ESXi VM: its disk and a data disk, monolithicFlat VMDKs on one
    // pvscsi controller, and a vmxnet3 NIC on a port group this host has no network for.
    convert(
        &guest_image(),
        &t.path().join("lab.vmdk"),
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
    );
    write(&t.path().join("data.raw"), &mixed_disk(MIB, 43));
    convert(
        &t.path().join("data.raw"),
        &t.path().join("data.vmdk"),
        "vmdk",
        &["-o", "subformat=monolithicFlat"],
    );
    let vm = format!("lmesx{}", std::process::id());
    let vmx = esxi_config(t.path(), &vm, &["lab.vmdk", "data.vmdk"]);
    let mut text = std::fs::read_to_string(&vmx).unwrap();
    text.push_str(
        "ethernet0.present = \"TRUE\"\nethernet0.virtualDev = \"vmxnet3\"\n\
         ethernet0.networkName = \"VM Network\"\nethernet0.addressType = \"generated\"\n\
         ethernet0.generatedAddress = \"00:0c:29:aa:bb:cc\"\n",
    );
    write(&vmx, text.as_bytes());
    let repo = repo_with_backup(t.path(), &vmx);

    let _port111 = port_111_lock();
    let server = Server::start(&repo, &t.path().join("state"), "127.0.0.1:111", &[]);

    // The default mapping keeps the disks on pvscsi, one SCSI target each. The test guest's
    // initramfs has virtio drivers only, so it cannot find its root there; but SeaBIOS boots
    // its kernel from the pvscsi disk, which says QEMU took the controller and both disks.
    let pv = format!("{vm}-pv");
    let out = server.cli(&["mount", &vm, "--for", "kvm", "--name", &pv]);
    for wanted in [
        "scsi0:0 (pvscsi disk) -> sda on a vmpvscsi SCSI controller",
        "scsi0:1 (pvscsi disk) -> sdb on a vmpvscsi SCSI controller",
    ] {
        assert!(out.contains(wanted), "{wanted:?} missing in:\n{out}");
    }
    let console = t.path().join("pv.log");
    let domain = start_converted(&server, t.path(), &pv, &format!("{vm}.xml"), &console);
    let log = wait_for(&console, "LIVEMOUNT-GUEST-FAILED");
    assert!(
        log.contains("LIVEMOUNT-GUEST-FAILED cannot mount /dev/vda2"),
        "the kernel did not start from the pvscsi disk:\n{log}"
    );
    drop(domain);

    // With --disk-bus virtio the guest boots to its end.
    let mount = format!("{vm}-lm2");
    let out = server.cli(&["mount", &vm, "--for", "kvm", "--disk-bus", "virtio"]);
    for wanted in [
        "converted from esxi for kvm",
        "scsi0:0 (pvscsi disk) -> vda (virtio-blk)",
        "scsi0:1 (pvscsi disk) -> vdb (virtio-blk)",
        "ethernet0 (vmxnet3 NIC) -> e1000e NIC on network VM Network",
        "firmware (BIOS) -> SeaBIOS on a q35 machine",
        &format!("virsh define {mount}.xml"),
    ] {
        assert!(out.contains(wanted), "{wanted:?} missing in:\n{out}");
    }
    let def = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/{vm}.xml"))],
    );
    let xml = String::from_utf8(def.stdout).unwrap();
    for wanted in [
        format!("protocol='nfs' name='/livemount/{mount}/lab.raw'"),
        format!("protocol='nfs' name='/livemount/{mount}/data.raw'"),
        "<interface type='user'>".to_owned(),
        "<link state='down'/>".to_owned(),
    ] {
        assert!(xml.contains(&wanted), "{wanted} missing in:\n{xml}");
    }
    assert!(!xml.contains("00:0c:29:aa:bb:cc"), "a new MAC: {xml}");
    let console = t.path().join("console.log");
    let t0 = std::time::Instant::now();
    let _domain = start_converted(&server, t.path(), &mount, &format!("{vm}.xml"), &console);
    let log = wait_for(&console, "LIVEMOUNT-GUEST-DONE");
    assert!(
        log.contains("LIVEMOUNT-GUEST-BOOTED") && log.contains("LIVEMOUNT-GUEST-DONE"),
        "the converted VM did not boot under libvirt:\n{log}"
    );
    eprintln!(
        "esxi backup for kvm: guest done {:.2} s after virsh start",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn a_kvm_backup_mounted_for_esxi_serves_a_vmx_and_descriptors_that_read_byte_identical() {
    let t = tempfile::tempdir().unwrap();
    let a = mixed_disk(6 * MIB, 41);
    let b = mixed_disk(3 * MIB, 42);
    write(&t.path().join("a.img"), &a);
    write(&t.path().join("b.img"), &b);
    let cfg = kvm_config(t.path(), "kvm02", &[("a.img", "raw"), ("b.img", "raw")]);
    let repo = repo_with_backup(t.path(), &cfg);
    let _port111 = port_111_lock();
    let state = t.path().join("state");
    let server = Server::start(&repo, &state, "127.0.0.1:111", &[]);

    // What the target lacks is refused, and nothing is mounted.
    for (args, wanted) in [
        (
            vec!["--for", "esxi", "--disk-bus", "virtio"],
            "ESXi has no virtio disks; use scsi (pvscsi) or sata",
        ),
        (
            vec!["--nic-model", "e1000"],
            "apply to a config converted with --for esxi",
        ),
    ] {
        let mut all = vec!["mount", "kvm02", "--state", state.to_str().unwrap()];
        all.extend(args);
        let out = livemount(&all);
        assert!(!out.status.success());
        let text = output_text(&out);
        assert!(
            text.contains(wanted) && text.contains("nothing was mounted"),
            "{text}"
        );
    }
    assert!(
        !server.cli(&["mounts"]).contains("kvm02"),
        "a refused mount is not listed"
    );

    let reply: serde_json::Value = serde_json::from_str(&server.cli(&[
        "mount",
        "kvm02",
        "--for",
        "esxi",
        "--disk-bus",
        "scsi",
        "--json",
    ]))
    .unwrap();
    let m = &reply["mount"];
    let mount = m["spec"]["name"].as_str().unwrap().to_owned();
    assert_eq!(m["hypervisor"], "esxi");
    assert_eq!(m["converted_from"], "kvm");
    assert_eq!(m["config"], "kvm02.vmx");
    let devices = m["devices"].to_string();
    assert!(
        devices.contains("scsi0:0 on a pvscsi SCSI controller"),
        "{devices}"
    );
    assert!(
        reply["attach"]["esxi"][1]
            .as_str()
            .unwrap()
            .contains(&format!(
                "registervm /vmfs/volumes/livemount/{mount}/kvm02.vmx"
            )),
        "{reply}"
    );
    let url = |file: &str| format!("nfs://127.0.0.1/livemount/{mount}/{file}");
    let vmx_bytes = {
        let out = client(
            "nfs-cat",
            &[&server.libnfs_url(&format!("{mount}/kvm02.vmx"))],
        );
        assert!(out.status.success(), "{}", output_text(&out));
        out.stdout
    };
    let vmx = livemount::vmconfig::parse("kvm02.vmx", &vmx_bytes).unwrap();
    assert_eq!(vmx.hypervisor, livemount::vmconfig::Hypervisor::Esxi);
    assert_eq!(vmx.name, mount);
    let paths: Vec<&str> = vmx.disks.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(paths, ["a.vmdk", "b.vmdk"]);
    let text = String::from_utf8_lossy(&vmx_bytes);
    assert!(text.contains("scsi0.virtualDev = \"pvscsi\""), "{text}");
    assert!(!text.contains("ethernet0"), "the VM had no NIC: {text}");

    // QEMU cannot follow a descriptor's relative extent over nfs:// (decision 0004: its NFS
    // driver gives a file's own path as its folder). So each flat file is compared over
    // nfs://, and each descriptor and its flat file, exactly as served, are fetched into one
    // folder where qemu-img opens the descriptor.
    let local = t.path().join("served");
    std::fs::create_dir(&local).unwrap();
    for (desc, flat, source, size) in [
        ("a.vmdk", "a-flat.vmdk", "a.img", 6 * MIB),
        ("b.vmdk", "b-flat.vmdk", "b.img", 3 * MIB),
    ] {
        let source = t.path().join(source);
        let source = source.to_str().unwrap();
        let out = client(
            "qemu-img",
            &["compare", "-f", "raw", "-F", "raw", &url(flat), source],
        );
        assert!(out.status.success(), "{flat}: {}", output_text(&out));
        for name in [desc, flat] {
            let out = client("nfs-cat", &[&server.libnfs_url(&format!("{mount}/{name}"))]);
            assert!(out.status.success(), "{name}: {}", output_text(&out));
            write(&local.join(name), &out.stdout);
        }
        let text = std::fs::read_to_string(local.join(desc)).unwrap();
        assert!(
            text.contains(&format!("RW {} VMFS \"{flat}\"", size / 512))
                && text.contains("ddb.adapterType = \"lsilogic\""),
            "{text}"
        );
        let desc = local.join(desc);
        let desc = desc.to_str().unwrap();
        let info = client("qemu-img", &["info", "--output=json", desc]);
        assert!(info.status.success(), "{}", output_text(&info));
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["format"], "vmdk", "{info}");
        assert_eq!(info["virtual-size"], size, "{info}");
        let out = client(
            "qemu-img",
            &["compare", "-f", "vmdk", "-F", "raw", desc, source],
        );
        assert!(out.status.success(), "{desc}: {}", output_text(&out));
    }

    // A restart serves the same converted config and files.
    let before = server.cli(&["mounts", "--json"]);
    drop(server);
    let server = Server::start(&repo, &state, "127.0.0.1:111", &[]);
    let out = client(
        "nfs-cat",
        &[&server.libnfs_url(&format!("{mount}/kvm02.vmx"))],
    );
    assert_eq!(out.stdout, vmx_bytes, "the same .vmx after a restart");
    let after = server.cli(&["mounts", "--json"]);
    let (before, after): (serde_json::Value, serde_json::Value) = (
        serde_json::from_str(&before).unwrap(),
        serde_json::from_str(&after).unwrap(),
    );
    assert_eq!(after[0]["converted_from"], "kvm", "{after}");
    assert_eq!(after[0]["devices"], before[0]["devices"], "{after}");
    assert_eq!(after[0]["files"], before[0]["files"], "{after}");
    let out = client(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &url("a-flat.vmdk"),
            t.path().join("a.img").to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "after restart: {}", output_text(&out));
}

//! nfs3_client helpers: a connection to a mount's folder and one call per helper, each
//! returning the NFS status (or panicking with the procedure's name on a transport error).

use nfs3_client::nfs3_types::nfs3::*;
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::Nfs3ConnectionBuilder;
use tokio::net::TcpStream;

use super::Server;

pub type Conn = nfs3_client::Nfs3Connection<TokioIo<TcpStream>>;

pub async fn connect(server: &Server, mount: &str) -> Conn {
    Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", format!("/livemount/{mount}"))
        .mount_port(server.nfs_port)
        .nfs3_port(server.nfs_port)
        .credential(opaque_auth::auth_unix(&auth_unix::default()))
        .mount()
        .await
        .expect("MNT of the mount's folder")
}

pub fn name(s: &str) -> filename3<'static> {
    filename3::from(s.as_bytes().to_vec())
}

pub async fn lookup(c: &mut Conn, dir: &nfs_fh3, n: &str) -> Result<nfs_fh3, nfsstat3> {
    match c
        .lookup(&LOOKUP3args {
            what: diropargs3 {
                dir: dir.clone(),
                name: name(n),
            },
        })
        .await
        .unwrap()
    {
        LOOKUP3res::Ok(ok) => Ok(ok.object),
        LOOKUP3res::Err((e, _)) => Err(e),
    }
}

pub async fn create(c: &mut Conn, dir: &nfs_fh3, n: &str) -> nfs_fh3 {
    let args = CREATE3args {
        where_: diropargs3 {
            dir: dir.clone(),
            name: name(n),
        },
        how: createhow3::UNCHECKED(sattr3::default()),
    };
    match c.create(&args).await.unwrap() {
        CREATE3res::Ok(ok) => match ok.obj {
            post_op_fh3::Some(h) => h,
            post_op_fh3::None => lookup(c, dir, n).await.unwrap(),
        },
        CREATE3res::Err((e, _)) => panic!("CREATE {n}: {e:?}"),
    }
}

pub async fn nfs_write(c: &mut Conn, fh: &nfs_fh3, offset: u64, data: &[u8]) {
    let args = WRITE3args {
        file: fh.clone(),
        offset,
        count: data.len() as u32,
        stable: stable_how::FILE_SYNC,
        data: data.into(),
    };
    assert!(
        matches!(c.write(&args).await.unwrap(), WRITE3res::Ok(_)),
        "WRITE"
    );
}

pub async fn read_all(c: &mut Conn, fh: &nfs_fh3) -> Vec<u8> {
    let args = READ3args {
        file: fh.clone(),
        offset: 0,
        count: 1 << 20,
    };
    match c.read(&args).await.unwrap() {
        READ3res::Ok(ok) => ok.data.to_vec(),
        READ3res::Err((e, _)) => panic!("READ: {e:?}"),
    }
}

pub async fn size(c: &mut Conn, fh: &nfs_fh3) -> u64 {
    match c
        .getattr(&GETATTR3args { object: fh.clone() })
        .await
        .unwrap()
    {
        GETATTR3res::Ok(ok) => ok.obj_attributes.size,
        GETATTR3res::Err(e) => panic!("GETATTR: {e:?}"),
    }
}

pub async fn set_size(c: &mut Conn, fh: &nfs_fh3, sz: u64) -> nfsstat3 {
    let attr = sattr3 {
        size: set_size3::Some(sz),
        ..sattr3::default()
    };
    match c
        .setattr(&SETATTR3args {
            object: fh.clone(),
            new_attributes: attr,
            guard: sattrguard3::None,
        })
        .await
        .unwrap()
    {
        SETATTR3res::Ok(_) => nfsstat3::NFS3_OK,
        SETATTR3res::Err((e, _)) => e,
    }
}

pub async fn rename(c: &mut Conn, dir: &nfs_fh3, from: &str, to: &str) -> nfsstat3 {
    let args = RENAME3args {
        from: diropargs3 {
            dir: dir.clone(),
            name: name(from),
        },
        to: diropargs3 {
            dir: dir.clone(),
            name: name(to),
        },
    };
    match c.rename(&args).await.unwrap() {
        RENAME3res::Ok(_) => nfsstat3::NFS3_OK,
        RENAME3res::Err((e, _)) => e,
    }
}

pub async fn remove(c: &mut Conn, dir: &nfs_fh3, n: &str) -> nfsstat3 {
    match c
        .remove(&REMOVE3args {
            object: diropargs3 {
                dir: dir.clone(),
                name: name(n),
            },
        })
        .await
        .unwrap()
    {
        REMOVE3res::Ok(_) => nfsstat3::NFS3_OK,
        REMOVE3res::Err((e, _)) => e,
    }
}

pub async fn rmdir(c: &mut Conn, dir: &nfs_fh3, n: &str) -> nfsstat3 {
    match c
        .rmdir(&RMDIR3args {
            object: diropargs3 {
                dir: dir.clone(),
                name: name(n),
            },
        })
        .await
        .unwrap()
    {
        RMDIR3res::Ok(_) => nfsstat3::NFS3_OK,
        RMDIR3res::Err((e, _)) => e,
    }
}

pub async fn read_at(
    c: &mut Conn,
    fh: &nfs_fh3,
    offset: u64,
    count: u32,
) -> Result<Vec<u8>, nfsstat3> {
    let args = READ3args {
        file: fh.clone(),
        offset,
        count,
    };
    match c.read(&args).await.expect("READ") {
        READ3res::Ok(ok) => Ok(ok.data.to_vec()),
        READ3res::Err((e, _)) => Err(e),
    }
}

/// WRITE with the given stability; returns the verifier.
pub async fn write_how(
    c: &mut Conn,
    fh: &nfs_fh3,
    offset: u64,
    data: &[u8],
    stable: stable_how,
) -> Result<writeverf3, nfsstat3> {
    let args = WRITE3args {
        file: fh.clone(),
        offset,
        count: data.len() as u32,
        stable,
        data: data.into(),
    };
    match c.write(&args).await.expect("WRITE") {
        WRITE3res::Ok(ok) => Ok(ok.verf),
        WRITE3res::Err((e, _)) => Err(e),
    }
}

/// COMMIT of the whole file; returns the verifier.
pub async fn commit(c: &mut Conn, fh: &nfs_fh3) -> Result<writeverf3, nfsstat3> {
    let args = COMMIT3args {
        file: fh.clone(),
        offset: 0,
        count: 0,
    };
    match c.commit(&args).await.expect("COMMIT") {
        COMMIT3res::Ok(ok) => Ok(ok.verf),
        COMMIT3res::Err((e, _)) => Err(e),
    }
}

/// One READDIR call (procedure 16): (name, cookie) of each entry, and eof.
pub async fn readdir(
    c: &mut Conn,
    dir: &nfs_fh3,
    cookie: u64,
    count: u32,
) -> Result<(Vec<(String, u64)>, bool), nfsstat3> {
    let args = READDIR3args {
        dir: dir.clone(),
        cookie,
        cookieverf: cookieverf3::default(),
        count,
    };
    match c.readdir(&args).await.expect("READDIR") {
        READDIR3res::Ok(ok) => Ok((
            ok.reply
                .entries
                .0
                .iter()
                .map(|e| {
                    (
                        String::from_utf8_lossy(e.name.as_ref()).into_owned(),
                        e.cookie,
                    )
                })
                .collect(),
            ok.reply.eof,
        )),
        READDIR3res::Err((e, _)) => Err(e),
    }
}

/// One READDIRPLUS call: (name, cookie) of each entry, and eof.
pub async fn readdirplus(
    c: &mut Conn,
    dir: &nfs_fh3,
    cookie: u64,
    maxcount: u32,
) -> Result<(Vec<(String, u64)>, bool), nfsstat3> {
    let args = READDIRPLUS3args {
        dir: dir.clone(),
        cookie,
        cookieverf: cookieverf3::default(),
        dircount: maxcount,
        maxcount,
    };
    match c.readdirplus(&args).await.expect("READDIRPLUS") {
        READDIRPLUS3res::Ok(ok) => Ok((
            ok.reply
                .entries
                .0
                .iter()
                .map(|e| {
                    (
                        String::from_utf8_lossy(e.name.as_ref()).into_owned(),
                        e.cookie,
                    )
                })
                .collect(),
            ok.reply.eof,
        )),
        READDIRPLUS3res::Err((e, _)) => Err(e),
    }
}

/// The whole of a mount's file FILE of SIZE bytes, read over NFS 1 MiB at a time.
pub fn read_file(server: &Server, mount: &str, file: &str, size: u64) -> Vec<u8> {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = connect(server, mount).await;
        let root = c.root_nfs_fh3();
        let fh = lookup(&mut c, &root, file).await.unwrap();
        let mut out = Vec::new();
        while (out.len() as u64) < size {
            out.extend(
                read_at(&mut c, &fh, out.len() as u64, 1 << 20)
                    .await
                    .unwrap(),
            );
        }
        out
    })
}
